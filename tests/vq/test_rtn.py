import pytest
import torch
from torch import nn

from vq4dit.vq.apply import quantize_linears_rtn
from vq4dit.vq.rtn import RTNLinear


def slow_rtn_row(row, bits):
    """Reference: one row on a uniform grid of 2^bits levels from its min to its max, nearest level."""
    lo, hi = float(row.min()), float(row.max())
    lo = float(torch.tensor(lo).half())
    step = float(torch.tensor((hi - lo) / (2**bits - 1)).half())
    levels = [lo + i * step for i in range(2**bits)]
    return torch.tensor([min(levels, key=lambda v: abs(v - float(x))) for x in row])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_matches_slow_reference(bits):
    torch.manual_seed(bits)
    linear = nn.Linear(12, 5)
    layer = RTNLinear.from_linear(linear, bits)
    ref = torch.stack([slow_rtn_row(r, bits) for r in linear.weight.detach()])
    torch.testing.assert_close(layer.weight(), ref, atol=1e-6, rtol=1e-5)
    assert layer.codes.max() <= 2**bits - 1 and layer.codes.min() >= 0


def test_forward_is_linear_with_reconstructed_weight():
    linear = nn.Linear(8, 6)
    layer = RTNLinear.from_linear(linear, 3)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight(), linear.bias))


def test_error_shrinks_with_bits():
    linear = nn.Linear(64, 32)
    errors = [(RTNLinear.from_linear(linear, b).weight() - linear.weight).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


def test_replaces_only_matching_linears():
    model = nn.ModuleDict({"blocks": nn.ModuleList([nn.Sequential(nn.Linear(4, 4))]), "head": nn.Linear(4, 2)})
    layers = quantize_linears_rtn(model, 2)
    assert list(layers) == ["blocks.0.0"]
    assert isinstance(model["blocks"][0][0], RTNLinear) and isinstance(model["head"], nn.Linear)
    assert layers["blocks.0.0"].bits_per_weight() == 2
    assert layers["blocks.0.0"].bits_per_weight(include_codebook=True) == 2 + 32 / 4
