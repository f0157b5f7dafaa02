"""Methods as objects (jobs/methods.py): every configured method is registered, and each builds and prepares its
layers as its contract says."""
import copy

import pytest
import torch

from jobs.config import METHODS, load_config
from jobs.methods import METHODS as REGISTRY
from jobs.methods import method_for
from tests.calib.conftest import tiny_dit
from vq import VQLinear, quantize_linears
from vq.apply import BLOCK_LINEARS
from vq.rtn import RTNLinear


def codebooks(**overrides):
    return load_config(overrides={"codebook_size": 16, "dim": 2, "kmeans_iters": 5, **overrides}).codebooks


def test_every_configurable_method_is_registered():
    assert sorted(REGISTRY) == sorted(METHODS)


@pytest.mark.parametrize("name,kind,calibrated,candidates", [
    ("rtn", RTNLinear, False, 1), ("kmeans", VQLinear, False, 1), ("codebook", VQLinear, True, 1),
    ("vq4dit", VQLinear, True, 2),
])
def test_build_replaces_every_selected_linear_with_hard_layers(name, kind, calibrated, candidates):
    model = tiny_dit(depth=2)
    method = method_for(name, codebooks())
    layers = method.build(model, BLOCK_LINEARS, seed=0, progress=False)
    assert len(layers) == 2 * 5 and all(type(layer) is kind and layer.is_hard for layer in layers.values())
    assert all(model.get_submodule(n) is layer for n, layer in layers.items())
    assert method.calibrated == calibrated and method.candidates == candidates


def test_vq4dit_prepare_gives_exactly_what_quantizing_soft_gives():
    """Layers built hard and softened when calibration reaches them equal layers quantized soft at once (mutation:
    prepare ignoring ratio_init, or the candidate count)."""
    c = codebooks(candidates=3, ratio_init="uniform")
    teacher = tiny_dit(depth=1)
    lazy_model, eager_model = copy.deepcopy(teacher), copy.deepcopy(teacher)
    method = method_for("vq4dit", c)
    lazy = method.build(lazy_model, BLOCK_LINEARS, seed=4, progress=False)
    fp_weights = {n: teacher.get_submodule(n).weight.detach() for n in lazy}
    method.prepare(lazy, fp_weights)
    eager = quantize_linears(eager_model, c.k, c.dim, candidates=3, seed=4, kmeans_iters=c.kmeans_iters,
                             ratio_init="uniform", progress=False)
    for name, layer in lazy.items():
        assert not layer.is_hard and layer.num_candidates == 3
        a, b = layer.state_dict(), eager[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_codebook_prepare_trains_hard_layers():
    method = method_for("codebook", codebooks())
    model = tiny_dit(depth=1)
    soft = quantize_linears(model, 16, 2, candidates=2, kmeans_iters=5, progress=False)  # e.g. an eager soft layer
    method.prepare(soft, {})
    assert all(layer.is_hard for layer in soft.values())
