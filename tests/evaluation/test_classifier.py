import os

import pytest
import torch

from vq4dit.evaluation.classifier import (
    DigitsClassifier,
    accuracy,
    load_classifier,
    save_classifier,
    shift_augment,
    train_classifier,
)
from vq4dit.models.digits import load_digits_images, split_indices
from vq4dit.utils.resources import DIGITS_CLASSIFIER

WEIGHTS = DIGITS_CLASSIFIER


def test_shift_augment_matches_pixel_loop():
    x = torch.randn(5, 1, 6, 6)
    got = shift_augment(x, torch.Generator().manual_seed(0))
    offsets = torch.randint(0, 3, (5, 2), generator=torch.Generator().manual_seed(0))
    for n in range(5):
        dy, dx = (int(v) - 1 for v in offsets[n])  # image content moves by (-dy, -dx)
        for i in range(6):
            for j in range(6):
                si, sj = i + dy, j + dx
                expected = x[n, 0, si, sj] if 0 <= si < 6 and 0 <= sj < 6 else -1.0
                assert got[n, 0, i, j] == expected


def test_training_is_seeded_and_round_trips(tmp_path):
    images, labels = load_digits_images()
    a = train_classifier(images[:128], labels[:128], epochs=1, seed=3)
    b = train_classifier(images[:128], labels[:128], epochs=1, seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    save_classifier(a, tmp_path / "c.safetensors", {"seed": "3"})
    c = load_classifier(tmp_path / "c.safetensors")
    x = images[:4]
    assert torch.equal(c(x), a(x)) and c.features(x).shape == (4, 128)


@pytest.mark.skipif(not os.path.isfile(WEIGHTS), reason="classifier weights not trained")
def test_committed_classifier_reads_held_out_digits():
    images, labels = load_digits_images()
    _, test_idx = split_indices(len(images), seed=0)
    model = load_classifier(WEIGHTS)
    assert isinstance(model, DigitsClassifier)
    assert accuracy(model, images[test_idx], labels[test_idx]) >= 0.97
