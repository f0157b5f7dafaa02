"""Sampling to files: the ADM npz, the class-sorted grid, label parsing, sharding invariance, atomic writes."""
import os

import numpy as np
import pytest
import torch

from models import distributed
from models.images import make_grid, parse_classes, resolve_device, sample_images, sample_to_dir, save_npz
from utils.errors import UserError


@pytest.mark.parametrize("classes,batch_size", [(None, 64), ([2, 7], 2)])
def test_npz_format(tmp_path, tiny_dit, classes, batch_size):
    model, _ = tiny_dit
    images, labels = sample_to_dir(model, tmp_path, num_samples=5, classes=classes, seed=1, steps=3,
                                   batch_size=batch_size, progress=False)
    with np.load(tmp_path / "samples.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        arr, lab = npz["arr_0"], npz["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 3)
    assert lab.dtype == np.int64 and lab.shape == (5,)
    np.testing.assert_array_equal(arr, images)
    np.testing.assert_array_equal(lab, labels)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()  # grey digits as RGB
    if classes:
        assert lab.tolist() == [2, 7, 2, 7, 2]
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "samples.npz"]  # no temporary files left


def test_same_seed_same_bytes_any_batch_size(tmp_path, tiny_dit):
    model, _ = tiny_dit
    arrays = []
    for name, seed, batch_size in [("a", 5, 64), ("b", 5, 2), ("c", 6, 64)]:
        sample_to_dir(model, tmp_path / name, num_samples=5, seed=seed, steps=3, batch_size=batch_size, progress=False)
        with np.load(tmp_path / name / "samples.npz") as npz:
            arrays.append((npz["arr_0"].tobytes(), npz["arr_1"].tolist()))
    assert arrays[0] == arrays[1]
    assert arrays[0][0] != arrays[2][0]


@pytest.mark.parametrize("size", [2, 3])
def test_shards_are_rows_of_the_single_process_run(monkeypatch, tiny_dit, size):
    """Under torchrun rank r samples positions r, r+size, ...: the same images as those rows of a 1-process run."""
    model, _ = tiny_dit
    full, labels = sample_images(model, 5, seed=2, steps=3, progress=False)
    for rank in range(size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(size))
        local, local_labels = sample_images(model, 5, seed=2, steps=3, batch_size=1, progress=False)
        np.testing.assert_array_equal(local, full[rank::size])
        np.testing.assert_array_equal(local_labels, labels)  # every rank knows all labels
    assert distributed.shard(5, 1, size).tolist() == list(range(1, 5, size))


def test_sample_images_subsets_and_empty_shard(monkeypatch, tiny_dit):
    model, _ = tiny_dit
    full, _ = sample_images(model, 2, classes=[4], seed=0, steps=2, progress=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    local, labels = sample_images(model, 2, classes=[4], seed=0, steps=2, progress=False)
    assert local.shape == (0, 8, 8, 3) and local.dtype == np.uint8
    assert labels.tolist() == [4, 4] and full.shape == (2, 8, 8, 3)


def colour_tiles(n):
    """n solid 4x4 tiles with distinct colours (green 200 keeps them apart from the white page and black text)."""
    images = np.zeros((n, 4, 4, 3), np.uint8)
    for i in range(n):
        images[i] = (10 + 9 * i, 200, 60)
    return images


def tile_boxes(grid, images):
    """(top, left) of each image's tile in the grid, found by its colour."""
    arr = np.asarray(grid)
    boxes = []
    for img in images:
        ys, xs = np.nonzero((arr == img[0, 0]).all(axis=2))
        assert len(ys), "tile missing from the grid"
        boxes.append((ys.min(), xs.min()))
    return boxes


@pytest.mark.parametrize("labels,max_cols", [([3, 1, 3, 0, 1, 3], 16), ([2, 2, 0, 2, 2, 2, 0], 2)])
def test_grid_rows_are_classes_in_order(labels, max_cols):
    images = colour_tiles(len(labels))
    grid = make_grid(images, labels, max_cols=max_cols, min_tile=8)
    boxes = tile_boxes(grid, images)
    # expected layout: classes ascending, sample-index order within a class, wrapping after max_cols
    expected_rows = []
    for c in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        expected_rows += [idx[s:s + max_cols] for s in range(0, len(idx), max_cols)]
    tops = sorted({top for top, _ in boxes})
    assert len(tops) == len(expected_rows)
    for r, row in enumerate(expected_rows):
        assert [boxes[i][0] for i in row] == [tops[r]] * len(row)
        lefts = [boxes[i][1] for i in row]
        assert lefts == sorted(lefts) and len(set(lefts)) == len(lefts)
    # tiles are upscaled (nearest) to at least min_tile pixels
    arr = np.asarray(grid)
    top, left = boxes[0]
    assert (arr[top:top + 8, left:left + 8] == images[0, 0, 0]).all()


def test_grid_is_bounded_and_many_classes_pack_into_rows():
    labels = [5, 3, 4, 1, 0, 2, 9, 8, 7, 6]
    images = colour_tiles(len(labels))
    grid = make_grid(images, labels, max_cols=3, min_tile=4, pad=0, max_samples=7, max_class_rows=4)
    arr = np.asarray(grid)
    for i in range(7, 10):  # beyond max_samples: not drawn
        assert not (arr == images[i, 0, 0]).all(axis=2).any()
    boxes = tile_boxes(grid, images[:7])
    order = sorted(range(7), key=lambda i: labels[i])  # by class, max_cols per row
    for pos, i in enumerate(order):
        assert boxes[i][0] == 4 * (pos // 3)
    assert arr.shape[0] == 4 * 3  # ceil(7 / 3) rows of 4-pixel tiles


@pytest.mark.parametrize("text,num_classes,expected", [("1,3,5", 10, [1, 3, 5]), (" 0 , 9 ", 10, [0, 9]),
                                                        ("999", 1000, [999]), ("", 10, None), (None, 10, None)])
def test_parse_classes(text, num_classes, expected):
    assert parse_classes(text, num_classes) == expected


@pytest.mark.parametrize("text,named", [("12", "12"), ("3,-1", "-1"), ("1,10", "10"), ("a,b", "a,b"),
                                        ("1.5", "1.5"), (",", ",")])
def test_parse_classes_errors_name_value_and_range(text, named):
    with pytest.raises(UserError) as info:
        parse_classes(text, 10)
    message = str(info.value)
    assert named in message and "0..9" in message and "--classes" in message


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("kwargs,named", [({"num_samples": 0}, "--num-samples 0"), ({"steps": 0}, "--steps 0"),
                                          ({"steps": -3}, "--steps -3"), ({"steps": 1001}, "--steps 1001"),
                                          ({"batch_size": 0}, "--batch-size 0")])
def test_sample_to_dir_rejects_bad_arguments(tmp_path, tiny_dit, kwargs, named):
    model, _ = tiny_dit
    with pytest.raises(UserError, match=named):
        sample_to_dir(model, tmp_path / "out", **{"num_samples": 2, "steps": 2, "progress": False, **kwargs})
    assert not (tmp_path / "out").exists()


def test_save_npz_is_atomic(tmp_path):
    path = tmp_path / "samples.npz"
    save_npz(path, np.zeros((2, 4, 4, 3)), [1, 2])
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_npz(path, np.array([["not", "an"], ["image", "!"]]), [0, 1])
    assert path.read_bytes() == before  # the failed write left the old file untouched
    assert os.listdir(tmp_path) == ["samples.npz"]  # and no temporary file
