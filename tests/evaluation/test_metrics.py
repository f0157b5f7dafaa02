"""FID, PSNR/MSE and accuracy against slow, obvious references."""
import math

import numpy as np
import pytest

from vq4dit.evaluation.metrics import (
    accuracy,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    paired_mse,
    psnr_from_mse,
)


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def symmetric_sqrt(s):
    """Square root of a symmetric PSD matrix through its eigendecomposition (clipping tiny negatives)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1, s2):
    """Tr (s1 s2)^(1/2) = Tr (s1^(1/2) s2 s1^(1/2))^(1/2), a symmetric form needing only eigh."""
    r1 = symmetric_sqrt(s1)
    return np.trace(symmetric_sqrt(r1 @ s2 @ r1))


def reference_fid(mu1, s1, mu2, s2):
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))


def test_fid_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)  # 9.25 + 4 + 1
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_fid_one_dimensional():
    assert frechet_distance([1.0], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(4.0 + 1.0)


@pytest.mark.parametrize("d", [2, 5, 16])
def test_fid_full_covariance_matches_symmetric_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_fid(mu1, s1, mu2, s2), rel=1e-8)


def test_fid_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=6), random_spd(rng, 6)
    mu2, s2 = rng.normal(size=6), random_spd(rng, 6)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu, s), rel=1e-8)


def test_fid_singular_covariances_stay_finite_and_close():
    rng = np.random.default_rng(1)
    d = 12
    s1, s2 = random_spd(rng, d, rank=3), random_spd(rng, d, rank=4)  # rank-deficient, like N < D
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    fid = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(fid)
    assert fid == pytest.approx(reference_fid(mu1, s1, mu2, s2), abs=1e-3)


def test_fid_retries_with_offset_when_sqrtm_fails(monkeypatch):
    import scipy.linalg

    rng = np.random.default_rng(4)
    mu1, mu2, s1, s2 = rng.normal(size=4), rng.normal(size=4), random_spd(rng, 4), random_spd(rng, 4)
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def failing_once(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    eps = 1e-2
    fid = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    offset = eps * np.eye(4)
    cross = trace_sqrt_product(s1 + offset, s2 + offset)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)
    assert len(calls) == 2
    assert fid == pytest.approx(expected, rel=1e-8)


def test_fid_rejects_complex_root():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance([0.0, 0.0], np.eye(2), [0.0, 0.0], np.diag([-1.0, 1.0]))


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_gaussian_stats_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, sigma = gaussian_stats(x)
    centered = x - x.mean(axis=0)
    assert np.allclose(mu, [3.0, 2.0])
    assert np.allclose(sigma, centered.T @ centered / 2)
    with pytest.raises(ValueError):
        gaussian_stats(x[:1])


def test_fid_from_features_approaches_population_value():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal(1.0, 2.0, size=(20000, 2))
    assert fid_from_features(a, b) == pytest.approx(2 * 1.0 + 2 * (2.0 - 1.0) ** 2, rel=0.03)


def test_mse_and_psnr_by_hand():
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # one pixel off by the full range out of 24
    assert paired_mse(a, b) == pytest.approx(1 / 24)
    assert psnr_from_mse(paired_mse(a, b)) == pytest.approx(10 * math.log10(24))
    assert psnr_from_mse(paired_mse(a, a)) == math.inf


def test_mse_matches_pixel_loop():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    total = sum((int(p) - int(q)) ** 2 for p, q in zip(a.ravel(), b.ravel()))
    mse_255 = total / a.size
    assert paired_mse(a, b) == pytest.approx(mse_255 / 255 ** 2, rel=1e-12)
    assert psnr_from_mse(paired_mse(a, b)) == pytest.approx(10 * math.log10(255 ** 2 / mse_255), rel=1e-12)
    with pytest.raises(ValueError):
        paired_mse(a, b[:2])
    with pytest.raises(ValueError, match="no values"):  # not a ZeroDivisionError, nor the NaN it was before
        paired_mse(a[:0], b[:0])


@pytest.mark.parametrize("shape, chunk_bytes", [((7, 5, 6, 3), 200), ((7, 5, 6, 3), 1), ((4, 3, 2, 5, 3), 2**24)])
def test_mse_in_chunks_is_the_float64_mean(shape, chunk_bytes):
    """Chunks of some samples, of less than one, of the whole array, and videos (N, F, H, W, 3): the float64 formula
    (mutation: a chunk's rows skipped or counted twice at its edges)."""
    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(2))
    diff = (a.astype(np.float64) - b.astype(np.float64)) / 255
    assert paired_mse(a, b, chunk_bytes) == pytest.approx(float(np.mean(diff * diff)), rel=1e-12)


def test_mse_memory_is_a_few_chunks_not_the_float64_arrays():
    """50,000 ImageNet samples are 9.8 GB as uint8 and were 79 GB as the float64 difference; the MSE now holds a
    few chunks (mutation: the whole difference at once -> 4x the inputs' size)."""
    import tracemalloc

    a = np.full((64, 128, 128, 3), 7, np.uint8)  # 3 MiB each
    b = np.zeros_like(a)
    tracemalloc.start()
    try:
        mse = paired_mse(a, b, chunk_bytes=2**18)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mse == pytest.approx((7 / 255) ** 2, rel=1e-12)
    assert peak <= 4 * 2**18


def test_accuracy_by_hand():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0], [5.0, 4.0]])
    assert accuracy(logits, np.array([1, 0, 0, 1])) == 0.5
    with pytest.raises(ValueError):
        accuracy(logits, np.array([1, 0]))
