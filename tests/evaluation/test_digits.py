"""Digits metrics with a tiny untrained classifier: pixel conversions, batching, FID/accuracy wiring."""
import numpy as np
import pytest
import torch

from vq4dit.evaluation.classifier import DigitsClassifier, save_classifier
from vq4dit.evaluation.digits import (
    classifier_outputs,
    digits_metrics,
    load_digits_classifier,
    real_digits_uint8,
    uint8_to_tensor,
)
from vq4dit.evaluation.metrics import fid_from_features
from vq4dit.models.vae import images_to_uint8
from vq4dit.utils.errors import UserError


def tiny_classifier(seed=0):
    """The project's classifier architecture, narrow and untrained (deterministic random weights)."""
    torch.manual_seed(seed)
    return DigitsClassifier(width=4, feature_dim=8).eval()


def test_uint8_round_trip_is_exact():
    values = np.arange(256, dtype=np.uint8)
    images = np.repeat(np.resize(values, (1, 16, 16, 1)), 3, axis=-1)  # (1, 16, 16, 3), every grey level
    x = uint8_to_tensor(images)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(images_to_uint8(x), images)


def test_tensor_to_uint8_rounds_and_clamps():
    levels = [-3.0, 0.0, 100.4, 100.5, 126.5, 127.5, 254.6, 255.0, 400.0]  # values of 127.5 (x + 1)
    x = torch.tensor(levels, dtype=torch.float64).reshape(1, 1, 1, -1) / 127.5 - 1
    u = images_to_uint8(x)
    assert u.shape == (1, 1, len(levels), 3)
    assert u[0, 0, :, 0].tolist() == [0, 0, 100, 101, 127, 128, 255, 255, 255]  # halves round up
    assert (u[..., 0] == u[..., 2]).all()


def test_real_digits():
    images, labels = real_digits_uint8()
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))


def test_outputs_do_not_depend_on_batch_size():
    images, _ = real_digits_uint8()
    classifier = tiny_classifier()
    f1, l1 = classifier_outputs(classifier, images[:50], batch_size=7)
    f2, l2 = classifier_outputs(classifier, images[:50], batch_size=512)
    assert f1.shape == (50, 8) and l1.shape == (50, 10) and f1.dtype == np.float64
    assert np.allclose(f1, f2, atol=1e-6) and np.allclose(l1, l2, atol=1e-6)


def test_digits_metrics_wiring():
    images, labels = real_digits_uint8()
    classifier = tiny_classifier()
    samples, sample_labels = images[:300], labels[:300]
    metrics = digits_metrics(classifier, samples, sample_labels, images)
    features, logits = classifier_outputs(classifier, samples)
    real_features, _ = classifier_outputs(classifier, images)
    assert metrics["fid"] == pytest.approx(fid_from_features(features, real_features), rel=1e-10)
    assert metrics["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == sample_labels))
    assert digits_metrics(classifier, samples, None, images)["accuracy"] is None
    assert digits_metrics(classifier, images, labels, images)["fid"] == pytest.approx(0, abs=1e-8)
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 16, 16, 3), dtype=np.uint8)
    assert digits_metrics(classifier, noise, None, images)["fid"] > metrics["fid"]


def test_load_classifier_round_trip_and_errors(tmp_path):
    model = tiny_classifier(seed=3)
    save_classifier(model, tmp_path / "c.safetensors")
    loaded = load_digits_classifier(str(tmp_path / "c.safetensors"))
    images, _ = real_digits_uint8()
    assert np.array_equal(classifier_outputs(loaded, images[:20])[1], classifier_outputs(model, images[:20])[1])
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(UserError, match="junk.safetensors: not a digits classifier"):
        load_digits_classifier(str(tmp_path / "junk.safetensors"))
    with pytest.raises(UserError, match="no such file"):
        load_digits_classifier(str(tmp_path / "missing.safetensors"))
