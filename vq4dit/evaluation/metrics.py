"""Pure metric functions on numpy arrays: Frechet distance (FID), paired MSE / PSNR, class accuracy.

Conventions (used by evaluate.py and written into its JSON):
  - MSE is on the [0, 1] pixel scale (uint8 values / 255), pooled over every pixel of every image.
  - PSNR is computed from that pooled MSE: 10 * log10(1 / mse), i.e. data range 255 on uint8 images.
    Pooling first (rather than averaging per-image PSNRs) keeps one near-identical image from
    dominating the average with a huge per-image PSNR. Identical inputs give PSNR = inf.
"""
import logging
import warnings

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)


def gaussian_stats(features):
    """features (N, D) -> mean (D,) and unbiased covariance (D, D), both float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(a):
    """scipy's matrix square root and its relative residual |X X - A| / |A| (inf if not finite).

    scipy's own warning on singular input is silenced: the residual decides whether to retry.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    if not np.isfinite(root).all():
        return root, float("inf")
    return root, float(np.linalg.norm(root @ root - a) / max(np.linalg.norm(a), np.finfo(np.float64).tiny))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    When the product is singular (e.g. fewer samples than feature dimensions) scipy's sqrtm can
    return non-finite or inaccurate roots; then `eps` * I is added to both covariances and the root
    recomputed. A root with a non-negligible imaginary diagonal is an error (not a valid Gaussian pair).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussian shapes: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    covmean, residual = _sqrtm(sigma1 @ sigma2)
    if residual > 1e-6:
        logger.warning("inaccurate sqrtm of the covariance product in FID (relative residual %.2g); "
                       "adding %g to the diagonals", residual, eps)
        offset = eps * np.eye(mu1.size)
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if imaginary > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component of {imaginary:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2):
    """FID between two feature sets (N1, D) and (N2, D).

    FID estimated from N samples is biased upward (roughly by O(D / N)), so values are comparable
    only at equal N; report N with it.
    """
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def paired_mse(images, reference, chunk_bytes=2**24):
    """Pooled mean squared error on the [0, 1] scale between two uint8 arrays of the same shape (N, ...).

    The squared differences are summed as integers, `chunk_bytes` of each array at a time: exact, and the memory
    stays that of a few chunks (a float64 difference of 50,000 ImageNet samples would be 79 GB)."""
    if images.shape != reference.shape:
        raise ValueError(f"shape mismatch: {images.shape} vs {reference.shape}")
    if images.size == 0:
        raise ValueError(f"no values to compare: shape {images.shape}")
    rows = max(1, chunk_bytes // max(1, images[:1].nbytes))
    total = 0  # a Python int: 255^2 per value, exact for any count
    for start in range(0, len(images), rows):
        diff = images[start:start + rows].astype(np.int16) - reference[start:start + rows]  # (rows, ...)
        total += int(np.einsum("i,i->", diff.ravel(), diff.ravel(), dtype=np.int64))
    return total / images.size / 255.0 ** 2


def psnr_from_mse(mse):
    """PSNR in dB for an MSE on the [0, 1] scale (peak 1); inf for mse == 0."""
    if mse < 0:
        raise ValueError(f"mse must be >= 0, got {mse}")
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def accuracy(logits, labels):
    """Fraction of rows of logits (N, C) whose argmax equals labels (N,)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"need logits (N, C) and labels (N,), got {logits.shape} and {labels.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def warn_small_fid(samples, dims, logger):
    """A warning when an FID is computed from no more samples than its features have dimensions: their covariance
    is then singular and the FID mostly bias (a 2-sample FID printed 2492.9 without a word)."""
    if samples <= dims:
        logger.warning("FID over %d samples, no more than the %d feature dimensions: the samples' covariance is "
                       "singular and the value is mostly bias; compare FIDs only at equal and larger sample counts "
                       "(the results tables use 1000)", samples, dims)
