"""The fused Triton VQ dequantize-matmul (vq/kernels/triton_vq.py) against the decode reference: on a GPU when there
is one, else on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before the kernel is imported).
Skipped where triton is not installed. Shapes: the odd sizes, groups and codeword widths of test_decode.py that the
kernel supports, a codebook too large for the gathered table, rows across several tiles, a LoRA branch beside."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BEFORE = os.environ.get("TRITON_INTERPRET")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton and the kernel are imported

from tests.vq.test_decode import VQ_SHAPES, random_rtn, random_vq, slow_rtn_weight, slow_vq_weight  # noqa: E402
from vq4dit.vq.kernels.select import fused_supports, use_fused  # noqa: E402
from vq4dit.vq.kernels.triton_vq import vq_linear  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _restore_interpret_setting():
    """The rest of the session sees TRITON_INTERPRET as it was (the kernel stays interpreted once defined)."""
    yield
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def reference(layer, x):
    """F.linear of x with the element-by-element decoded weight, in float32."""
    return F.linear(x.float(), slow_vq_weight(layer).float(), layer.bias.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,k,dim,groups", [s for s in VQ_SHAPES if fused_supports(s[3])])
def test_fused_equals_the_decode_reference(in_f, out_f, k, dim, groups, dtype):
    """Mutations caught: a row's group taken from the wrong row count, indices expanded in the wrong order within a
    codeword, the last partial K step or N tile left unmasked, the bias dropped -> outputs differ."""
    layer = random_vq(in_f, out_f, k, dim, groups, dtype).to(DEVICE)
    x = torch.randn(3, 5, in_f).to(DEVICE, dtype)
    with torch.no_grad():
        y = layer.fused_forward(x)
    assert y.shape == (3, 5, out_f) and y.dtype == dtype
    torch.testing.assert_close(y.float().cpu(), reference(layer.cpu(), x.cpu()), **TOL[dtype])


@pytest.mark.parametrize("table", ["gather", "load"])
def test_both_codebook_tables_and_several_tiles(table):
    """70 rows (two row tiles at 64), 130 outputs (three column tiles), 136 inputs (three K steps, one partial), two
    groups; each table mode equals the reference (mutation: the group offset missing in one mode -> fails)."""
    layer = random_vq(136, 130, 16, 4, groups=2, seed=5).to(DEVICE)
    x = torch.randn(70, 136, device=DEVICE)
    with torch.no_grad():
        y = vq_linear(x, layer.codebook, layer.indices, layer.bias, table=table)
    torch.testing.assert_close(y.cpu(), reference(layer.cpu(), x.cpu()), **TOL[torch.float32])


def test_dispatch_with_lora_beside(monkeypatch):
    """VQ4DIT_FUSED=1 routes the forward of VQ layers with a supported d through the kernel (on the CPU via the
    interpreter), d = 3 and RTN layers through the decode path, with a PEFT LoRA branch beside two of them: equal to
    the references (mutation: use_fused true for d = 3 -> the kernel refuses it)."""
    from peft import LoraConfig, inject_adapter_in_model

    from vq4dit.vq.lora import enable_peft_lora

    monkeypatch.setenv("VQ4DIT_FUSED", "1")
    enable_peft_lora()
    layers = [random_vq(12, 10, 8, 2, groups=2, seed=3), random_vq(10, 9, 4, 1, seed=4), random_vq(9, 6, 4, 3),
              random_rtn(6, 4, 3)]
    x = torch.randn(5, 12)
    assert [use_fused(m, x.to(DEVICE)) for m in layers] == [True, True, False, False]
    model = nn.Sequential(*layers)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"], init_lora_weights=False), model)
    ref = x
    for i, layer in enumerate(layers):
        w = slow_vq_weight(layer) if i < 3 else slow_rtn_weight(layer)
        inputs, ref = ref, F.linear(ref, w, layer.bias)
        if i < 2:
            ref = ref + 2.0 * F.linear(F.linear(inputs, model[i].lora_A["default"].weight),
                                       model[i].lora_B["default"].weight)
    with torch.no_grad():
        y = model.to(DEVICE)(x.to(DEVICE)).cpu()
    torch.testing.assert_close(y, ref.detach(), **TOL[torch.float32])
