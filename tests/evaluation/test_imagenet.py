"""The torch-fidelity adapter, checked against a stand-in module (the real one is an optional extra)."""
import sys
import types

import numpy as np
import pytest
import torch

from vq4dit.evaluation.imagenet import import_torch_fidelity, inception_fid
from vq4dit.utils.errors import UserError


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity` raise ImportError
    with pytest.raises(UserError, match="pip install torch-fidelity"):
        import_torch_fidelity()


def test_adapter_feeds_uint8_chw_datasets(monkeypatch):
    calls = {}

    def calculate_metrics(**kwargs):
        calls.update(kwargs)
        return {"frechet_inception_distance": np.float32(12.5)}

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, size=(7, 8, 6, 3), dtype=np.uint8)
    assert inception_fid(images, ref) == 12.5
    assert calls["fid"] is True and calls["cache"] is False
    for dataset, expected in [(calls["input1"], images), (calls["input2"], ref)]:
        assert isinstance(dataset, torch.utils.data.Dataset) and len(dataset) == len(expected)
        item = dataset[3]
        assert item.dtype == torch.uint8 and item.shape == (3, 8, 6)
        assert np.array_equal(item.numpy(), expected[3].transpose(2, 0, 1))
