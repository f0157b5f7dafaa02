"""Digits metrics: FID in the feature space of the project's digits classifier, and class accuracy.

The "Inception network" of the embedded digits benchmark is the small CNN of evaluation/classifier.py:
FID uses its penultimate features, accuracy its logits. The reference distribution is all 1797 real
digits, quantized to uint8 exactly like samples are, so both sides see the same pixel grid.
"""
import logging
import os

import numpy as np
import torch
from safetensors import SafetensorError

from vq4dit.evaluation.classifier import load_classifier
from vq4dit.evaluation.metrics import accuracy, fid_from_features, warn_small_fid
from vq4dit.models.digits import IMAGE_SIZE, load_digits_images
from vq4dit.models.vae import images_to_uint8
from vq4dit.utils.errors import UserError
from vq4dit.utils.resources import DIGITS_CLASSIFIER

logger = logging.getLogger(__name__)



def uint8_to_tensor(images):
    """uint8 (N, H, W, 3) -> float32 (N, 1, H, W) in [-1, 1]; the grey value is the channel mean."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=-1)  # (N, H, W) in [0, 255]
    return (x / 127.5 - 1).unsqueeze(1)


def real_digits_uint8():
    """All real digits as uint8 (1797, 16, 16, 3) and labels int64 (1797,)."""
    x, y = load_digits_images(size=IMAGE_SIZE)
    return images_to_uint8(x), y.numpy()


def load_digits_classifier(path=DIGITS_CLASSIFIER):
    """The trained digits classifier in eval mode (see scripts/train_digits_classifier.py)."""
    if not os.path.isfile(path):
        raise UserError(f"--classifier {path}: no such file; train it with scripts/train_digits_classifier.py")
    try:
        return load_classifier(path).eval()
    except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"--classifier {path}: not a digits classifier saved by scripts/train_digits_classifier.py "
                        f"({type(e).__name__}: {e})") from None


@torch.no_grad()
def classifier_outputs(classifier, images, batch_size=512):
    """uint8 images (N, H, W, 3) -> penultimate features (N, D) float64 and logits (N, C) float64."""
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        x = uint8_to_tensor(images[start:start + batch_size])  # (B, 1, H, W)
        features.append(classifier.features(x).double())
        logits.append(classifier(x).double())
    return torch.cat(features).numpy(), torch.cat(logits).numpy()


def digits_metrics(classifier, images, labels, real_images):
    """FID of `images` against `real_images` (both uint8 (N, 16, 16, 3)) and accuracy against `labels`.

    labels may be None (accuracy is then None). FID is biased upward at small N; compare at equal N.
    """
    features, logits = classifier_outputs(classifier, images)
    real_features, _ = classifier_outputs(classifier, real_images)
    fid = fid_from_features(features, real_features)
    warn_small_fid(len(images), features.shape[1], logger)
    acc = accuracy(logits, labels) if labels is not None else None
    logger.info("digits: fid %.4f over %d samples vs %d real images, accuracy %s", fid, len(images), len(real_images),
                "-" if acc is None else f"{acc:.4f}")
    return {"fid": fid, "accuracy": acc}
