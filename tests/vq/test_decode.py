"""The inference decode path (vq/kernels/decode.py): every codec's weight and forward against slow element-by-element
references, bit for bit, on odd shapes, groups, every codeword width, float dtypes; one workspace buffer shared by
all layers; a LoRA branch beside a quantized layer; autograd never sees the shared buffer. Every test runs twice:
with the native CPU gather (vq/kernels/native.py) and with torch.index_select."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.vq.kernels import native
from vq4dit.vq.kernels.decode import (
    gather_codewords,
    planned_weight,
    release_workspace,
    wide_dtype,
    workspace_bytes,
    workspace_tensors,
)
from vq4dit.vq.layer import VQLinear
from vq4dit.vq.rtn import RTNLinear


@pytest.fixture(autouse=True, params=["native", "index_select"])
def gather_path(request, monkeypatch):
    """Which gather the CPU decode takes in this test (VQ4DIT_NATIVE), plans and buffers made afresh for it."""
    monkeypatch.setenv("VQ4DIT_NATIVE", "1" if request.param == "native" else "0")
    native._load.cache_clear()
    release_workspace()
    if request.param == "native" and native.native_gather() is None:
        pytest.skip("the native gather could not be built here (no C compiler?)")
    yield request.param
    native._load.cache_clear()
    release_workspace()


def random_vq(in_f, out_f, k, dim, groups=1, dtype=torch.float32, seed=0):
    """A hard VQLinear with random codebooks, indices and bias, built without k-means (fast at any size)."""
    gen = torch.Generator().manual_seed(seed)
    layer = VQLinear(in_f, out_f, k, dim, groups=groups, hard=True)
    with torch.no_grad():
        layer.codebook.copy_(torch.randn(layer.codebook.shape, generator=gen))
        layer.indices.copy_(torch.randint(0, k, layer.indices.shape, generator=gen))
        layer.bias.copy_(torch.randn(out_f, generator=gen))
    return layer.to(dtype).eval()


def random_rtn(in_f, out_f, bits, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return RTNLinear.from_linear(nn.Linear(in_f, out_f), bits).to(dtype).eval()


def slow_vq_weight(layer):
    """Sub-vector i of output row i * d // in is codebook[group of that row][indices[i]], one at a time."""
    rows_per_group = layer.out_features // layer.groups
    w = torch.empty(layer.out_features, layer.in_features, dtype=layer.codebook.dtype)
    per_row = layer.in_features // layer.dim
    for i, index in enumerate(layer.indices.tolist()):
        row, col = divmod(i, per_row)
        w[row, col * layer.dim:(col + 1) * layer.dim] = layer.codebook[row // rows_per_group, index]
    return w


def slow_rtn_weight(layer):
    """Element by element: code * scale + lo, each operation rounded in the layer's dtype."""
    w = torch.empty(layer.out_features, layer.in_features, dtype=layer.scale.dtype)
    for r in range(layer.out_features):
        for c in range(layer.in_features):
            w[r, c] = layer.codes[r, c].to(w.dtype) * layer.scale[r, 0] + layer.lo[r, 0]
    return w


# (in, out, k, d, groups): odd sizes; codewords of 4, 8, 12, 16, 32 bytes in fp32 (d = 3 and 8: the row path);
# k = 300 stores int16 indices; groups = 3 is a split qkv
VQ_SHAPES = [(20, 9, 8, 4, 1), (12, 15, 16, 4, 3), (6, 7, 5, 2, 1), (9, 4, 4, 3, 1), (16, 6, 6, 8, 3),
             (4, 25, 300, 1, 1), (8, 33, 8, 4, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,out_f,k,dim,groups", VQ_SHAPES)
def test_vq_decode_and_forward_equal_the_slow_reference(in_f, out_f, k, dim, groups, dtype):
    """Mutations caught: a group offset off by one, a wide view of the wrong width, the int32 cast skipped for int16
    indices, the row path's reshape transposed -> the weight differs."""
    layer = random_vq(in_f, out_f, k, dim, groups, dtype)
    ref = slow_vq_weight(layer)
    x = torch.randn(3, 5, in_f).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer.weight(), ref)
        assert torch.equal(layer(x), F.linear(x, ref, layer.bias))
    assert torch.equal(layer.weight().detach(), ref)  # autograd on: the training path agrees


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,bits", [(7, 5, 2), (13, 3, 3), (4, 9, 4)])
def test_rtn_decode_and_forward_equal_the_slow_reference(in_f, out_f, bits, dtype):
    """Mutation caught: scale and minimum applied as one fused multiply-add or in float32 -> different roundings."""
    layer = random_rtn(in_f, out_f, bits, dtype)
    ref = slow_rtn_weight(layer)
    x = torch.randn(4, in_f).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer.weight(), ref)
        assert torch.equal(layer(x), F.linear(x, ref, layer.bias))


def test_codeword_widths():
    """The wide scalar is exactly one codeword: a wrong table would gather parts of two codewords."""
    assert wide_dtype(4, torch.float32) == torch.complex128 and wide_dtype(4, torch.bfloat16) == torch.int64
    assert wide_dtype(2, torch.float16) == torch.int32 and wide_dtype(3, torch.float32) is None


def test_gather_writes_into_the_given_buffer():
    """Mutation caught: `out` ignored (a new tensor returned) -> the buffer stays unwritten."""
    layer = random_vq(12, 6, 8, 4, groups=3)
    buffer = torch.full((18, 4), float("nan"))
    with torch.no_grad():
        result = gather_codewords(layer.codebook, layer.indices, buffer)
    assert result.data_ptr() == buffer.data_ptr() and torch.equal(buffer.reshape(6, 12), slow_vq_weight(layer))


def test_layers_share_one_buffer_grown_to_the_largest(gather_path):
    """Three layers of different sizes in one model: outputs equal the references; the workspace holds one weight
    buffer of the largest layer, plus its int32 indices where index_select gathers (mutations: a buffer per layer,
    one not grown, or one grown into new memory while earlier plans keep the old -> fails)."""
    layers = [random_vq(16, 8, 8, 4, seed=1), random_vq(8, 40, 8, 2, groups=2, seed=2), random_rtn(40, 16, 2)]
    model = nn.Sequential(*layers)
    x = torch.randn(3, 16)
    ref = x
    for layer in layers:
        w = slow_vq_weight(layer) if isinstance(layer, VQLinear) else slow_rtn_weight(layer)
        ref = F.linear(ref, w, layer.bias)
    release_workspace()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), ref)
    largest = 40 * 16
    index_scratch = 0 if gather_path == "native" else (40 * 8 // 2) * 4
    assert workspace_bytes() == largest * 4 + index_scratch
    buffer = next(b for b in workspace_tensors() if b.is_floating_point())
    with torch.no_grad():  # every layer's plan writes into that one buffer, the first layer's too (grown since)
        assert all(planned_weight(m, torch.float32, x.device).data_ptr() == buffer.data_ptr() for m in layers)


def test_autograd_forward_keeps_its_own_weights():
    """With autograd on, each layer's decoded weight is its own tensor (autograd keeps it for the input gradient):
    gradients equal those through the reference weights. The layers are frozen, as under LoRA training, so the
    no-grad gather decodes them (mutation: the shared buffer under autograd -> the first layer's saved weight is
    overwritten by the second's, and backward fails)."""
    a, b = random_vq(8, 8, 8, 4, seed=1).requires_grad_(False), random_vq(8, 8, 8, 4, seed=2).requires_grad_(False)
    x = torch.randn(2, 8, requires_grad=True)
    nn.Sequential(a, b)(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(F.linear(x_ref, slow_vq_weight(a), a.bias), slow_vq_weight(b), b.bias).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_lora_branch_beside_a_decoded_layer():
    """PEFT's LoRA over quantized layers (vq/lora.py) at inference: base (through the shared buffer) + scale * B A x,
    equal to the hand-written sum; with autograd the LoRA matrices get the reference gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    from vq4dit.vq.lora import enable_peft_lora

    enable_peft_lora()
    layers = [random_vq(12, 10, 8, 2, groups=2, seed=3), random_rtn(10, 6, 3)]
    model = nn.Sequential(*layers)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"], init_lora_weights=False), model)
    x = torch.randn(5, 12)
    ref = x
    for i, layer in enumerate(layers):
        w = slow_vq_weight(layer) if isinstance(layer, VQLinear) else slow_rtn_weight(layer)
        lora_a, lora_b = model[i].lora_A["default"].weight, model[i].lora_B["default"].weight
        ref = F.linear(ref, w, layer.bias) + 2.0 * F.linear(F.linear(ref, lora_a), lora_b)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.detach(), rtol=1e-6, atol=1e-6)
    model(x).sum().backward()
    grad = model[0].lora_A["default"].weight.grad.clone()
    model.zero_grad()
    ref.sum().backward()
    torch.testing.assert_close(grad, model[0].lora_A["default"].weight.grad)


def test_cpu_forward_takes_the_fused_kernel_only_in_the_interpreter(monkeypatch):
    """On CPU tensors the fused Triton kernel runs only when asked for under TRITON_INTERPRET=1 (mutation: the
    device check dropped -> a CPU forward would try to launch a GPU kernel)."""
    from vq4dit.vq.kernels import select

    layer, x = random_vq(8, 4, 4, 4), torch.randn(2, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for setting in ("", "0", "1"):
        monkeypatch.setenv("VQ4DIT_FUSED", setting)
        assert not select.use_fused(layer, x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select.use_fused(layer, x) == select.triton_available()
    assert not select.use_fused(random_vq(9, 4, 4, 3), torch.randn(2, 9))  # d = 3: no kernel


def test_decode_plans_follow_changes_to_the_layer():
    """A layer's decode plan caches its codebook (cast) and views of the workspace: after an in-place write to the
    codebook or the RTN scale, new indices, another dtype, or a larger layer growing the workspace, the forward still
    equals the reference (mutation: plan_key without the codebook's write count -> the stale codebook is used)."""
    vq, rtn = random_vq(8, 6, 4, 4, groups=3), random_rtn(8, 5, 2)
    x = torch.randn(2, 8)

    def check(dtype):  # in bfloat16, the plan holds cast copies of the float32 tables
        for layer, ref in ((vq, slow_vq_weight), (rtn, slow_rtn_weight)):
            w = ref(copy.deepcopy(layer).to(dtype))
            assert torch.equal(layer(x.to(dtype)), F.linear(x.to(dtype), w, layer.bias.to(dtype)))

    release_workspace()
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            check(dtype)
            vq.codebook.mul_(2)
            rtn.scale.mul_(0.5)
            check(dtype)
            vq.assign_(vq.codebook.flip(1), vq.indices.flip(0))
            check(dtype)
            vq.indices = vq.indices.roll(1)
            check(dtype)
            random_vq(64, 64, 4, 4)(torch.randn(1, 64))  # grows the workspace in place
            check(dtype)
        vq.to(torch.bfloat16), rtn.to(torch.bfloat16)
        check(torch.bfloat16)
