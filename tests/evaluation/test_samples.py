"""Reading and validating ADM-format sample batches: every bad input is a one-line UserError."""
import numpy as np
import pytest

from vq4dit.evaluation.samples import check_reference, load_samples
from vq4dit.utils.errors import UserError


def batch(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, size=n)


def save(tmp_path, name="s.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_round_trip(tmp_path):
    images, labels = batch()
    got_images, got_labels = load_samples(save(tmp_path, arr_0=images, arr_1=labels.astype(np.int32)), num_classes=10)
    assert np.array_equal(got_images, images) and got_images.dtype == np.uint8
    assert np.array_equal(got_labels, labels) and got_labels.dtype == np.int64


def test_labels_optional(tmp_path):
    images, _ = batch()
    assert load_samples(save(tmp_path, arr_0=images))[1] is None


def one_line_error(path, match, **kwargs):
    with pytest.raises(UserError, match=match) as info:
        load_samples(path, **kwargs)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path):
    one_line_error(str(tmp_path / "nope.npz"), "no such file")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    one_line_error(str(path), "not a readable .npz")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    one_line_error(str(text), "not a readable .npz")


def test_a_npy_array_is_refused_before_it_is_read(tmp_path):
    """np.load would return a .npy's array (mutation: no zip check -> AttributeError/TypeError on .files)."""
    images, _ = batch()
    np.save(tmp_path / "samples.npy", images)
    one_line_error(str(tmp_path / "samples.npy"), r"not a readable \.npz \(not a zip archive; a \.npy array")


def test_no_arr_0(tmp_path):
    one_line_error(save(tmp_path, images=batch()[0]), "no arr_0")


def test_pickled_objects_refused(tmp_path):
    one_line_error(save(tmp_path, arr_0=np.array([{"a": 1}], dtype=object)), "not a readable .npz")


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 16, 16, 3), np.float32), "dtype float32"),
    (np.zeros((2, 16, 16), np.uint8), r"shape \(2, 16, 16\)"),
    (np.zeros((2, 16, 16, 1), np.uint8), r"shape \(2, 16, 16, 1\)"),
    (np.zeros((0, 16, 16, 3), np.uint8), "N >= 1"),
])
def test_bad_images(tmp_path, bad, match):
    one_line_error(save(tmp_path, arr_0=bad), match)


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 1, 2, 10]), r"span \[0, 10\]; must be in \[0, 10\)"),
    (np.array([-1, 1, 2, 3]), r"must be in \[0, 10\)"),
    (np.array([0, 1, 2]), r"must be integer labels of shape \(4,\)"),
    (np.array([0.0, 1.0, 2.0, 3.0]), "dtype float64"),
])
def test_bad_labels(tmp_path, labels, match):
    one_line_error(save(tmp_path, arr_0=batch()[0], arr_1=labels), match, num_classes=10)


def test_reference_must_pair_with_samples():
    images, labels = batch()
    check_reference(images, labels, images.copy(), labels.copy(), "ref.npz")
    other, _ = batch(n=5)
    with pytest.raises(UserError, match=r"ref.npz: reference images have shape \(5, 16, 16, 3\)"):
        check_reference(images, labels, other, labels, "ref.npz")
    shuffled = labels.copy()
    shuffled[2] = (labels[2] + 1) % 10
    with pytest.raises(UserError, match="at index 2"):
        check_reference(images, labels, images, shuffled, "ref.npz")
    with pytest.raises(UserError, match="reference does not"):
        check_reference(images, labels, images, None, "ref.npz")
    with pytest.raises(UserError, match="samples do not"):
        check_reference(images, None, images, labels, "ref.npz")
