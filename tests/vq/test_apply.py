"""quantize_linears on a tiny DiT: which layers, qkv modes, order-independent seeds, errors."""
import pytest
import torch

from vq4dit.models.loading import DiTSpec
from vq4dit.utils.errors import UserError
from vq4dit.vq.apply import quantize_linears
from vq4dit.vq.layer import CodebookSpec, VQLinear

TINY = DiTSpec("DiT-Digits/2", input_size=8, num_classes=3, in_channels=1)


def tiny_model():
    torch.manual_seed(0)
    model = TINY.build()
    for p in model.parameters():  # the zero-init adaLN would make k-means trivial
        torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("split_qkv", [False, True])
def test_replaces_the_five_block_linears(split_qkv):
    model = tiny_model()
    layers = quantize_linears(model, CodebookSpec(16, 4, kmeans_iters=2), split_qkv=split_qkv, progress=False)
    depth = len(model.blocks)
    assert len(layers) == 5 * depth
    names = {f"blocks.{i}.{s}" for i in range(depth)
             for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")}
    assert set(layers) == names
    for name, layer in layers.items():
        assert model.get_submodule(name) is layer
        assert layer.groups == (3 if split_qkv and name.endswith("qkv") else 1)
    assert not any(isinstance(m, VQLinear) for n, m in model.named_modules() if not n.startswith("blocks."))
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 2]))
    assert out.shape == (2, 2, 8, 8)


def test_layer_results_do_not_depend_on_order():
    spec = CodebookSpec(16, 4, kmeans_iters=2)
    all_layers = quantize_linears(tiny_model(), spec, progress=False)
    one = quantize_linears(tiny_model(), spec, include=r"^blocks\.3\.mlp\.fc1$", progress=False)
    assert list(one) == ["blocks.3.mlp.fc1"]
    assert torch.equal(one["blocks.3.mlp.fc1"].codebook, all_layers["blocks.3.mlp.fc1"].codebook)


def test_bad_dim_names_the_layer():
    with pytest.raises(UserError, match=r"layer blocks\.0\.attn\.qkv: in_features=128 is not divisible by dim=3"):
        quantize_linears(tiny_model(), CodebookSpec(16, 3), progress=False)


def test_include_matching_nothing():
    with pytest.raises(UserError, match="matches no nn.Linear"):
        quantize_linears(tiny_model(), CodebookSpec(16, 4), include=r"^nothing$", progress=False)
