"""Inference precision: resolving --precision, casting that keeps integer buffers, float32 timestep features in a
half-precision DiT, and how far bf16 / fp16 samples of the embedded model are from fp32 ones."""
import copy

import pytest
import torch

from tests.conftest import sample_dit
from vq4dit.evaluation.metrics import paired_mse, psnr_from_mse
from vq4dit.models.loading import load_dit
from vq4dit.utils.errors import UserError
from vq4dit.utils.precision import Precision, apply_precision, compute_dtype, resolve_precision
from vq4dit.vq.layer import CodebookSpec, VQLinear

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def tf32_flags():
    """Restore the process-wide TF32 flags after a test that sets them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name,device,expect", [
    (None, "cpu", Precision("fp32", torch.float32, False)),
    (None, "cuda", Precision("tf32", torch.float32, True)),  # the official DiT sampler's setting
    (None, "cuda:1", Precision("tf32", torch.float32, True)),
    ("tf32", "cpu", Precision("fp32", torch.float32, False)),  # TF32 is a CUDA matmul mode
    ("fp32", "cuda", Precision("fp32", torch.float32, False)),
    ("bf16", "cpu", Precision("bf16", torch.bfloat16, False)),
    ("fp16", "cpu", Precision("fp16", torch.float16, False)),
])
def test_resolve_precision(name, device, expect):
    assert resolve_precision(name, device) == expect


def test_unknown_or_unsupported_precision_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match="--precision fp8: use one of fp32, tf32, bf16, fp16"):
        resolve_precision("fp8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(UserError, match="--precision bf16: Tesla V100 has no bfloat16 support; use fp16"):
        resolve_precision("bf16", "cuda")

    def no_half(*args, **kwargs):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_half)
    with pytest.raises(UserError, match="--precision fp16: this torch build cannot run torch.float16 on the CPU"):
        resolve_precision("fp16", "cpu")


def test_apply_precision_sets_tf32_on_cuda_only(tiny_dit, tf32_flags):
    model, _ = tiny_dit
    apply_precision(model, resolve_precision("tf32", "cuda"), "cuda")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    apply_precision(model, resolve_precision("fp32", "cuda"), "cuda")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    apply_precision(model, resolve_precision("fp32", "cpu"), "cpu")  # a CPU run leaves the CUDA flags alone
    assert torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("dtype", HALF)
def test_casting_keeps_codeword_indices(tiny_dit, dtype):
    model, _ = tiny_dit
    fc1 = model.blocks[0].mlp.fc1
    layer = VQLinear.from_linear(fc1, CodebookSpec(16, 4, candidates=1, kmeans_iters=2)).harden()
    model.blocks[0].mlp.fc1 = layer
    indices, codebook = layer.indices.clone(), layer.codebook.detach().clone()
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    apply_precision(model, resolve_precision(name, "cpu"), "cpu")
    assert compute_dtype(model) == dtype
    assert layer.indices.dtype == torch.uint8 and torch.equal(layer.indices, indices)
    assert layer.codebook.dtype == dtype and torch.equal(layer.codebook, codebook.to(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_timestep_features_stay_float32_in_a_half_model(tiny_dit, dtype):
    """sin/cos of t * freq for t up to 999: in bf16, t = 999 alone rounds to 1000, a radian off at freq 1."""
    model, _ = tiny_dit
    half = copy.deepcopy(model).to(dtype)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ref = model.t_embedder(t)  # (N, D) float32
    got = half.t_embedder(t)
    assert got.dtype == dtype
    err = (got.float() - ref).abs().amax(1) / ref.abs().amax(1)  # per timestep, relative to its largest entry
    assert err.max() < 0.03, err  # half-precision weights only; features computed in bf16: 0.5 and more


# bf16 / fp16 against fp32 on the embedded digits model, same seeds: 4 samples, 8 steps. Measured (torch 2.13,
# this CPU): bf16 51 dB, fp16 60 dB at these settings; 200 samples at 50 steps: see docs/usage.md "Precision".
PSNR_BOUND = {"bf16": 40.0, "fp16": 45.0}


@pytest.fixture(scope="module")
def digits_fp32(tmp_path_factory):
    model, _ = load_dit(None)
    images, _ = sample_dit(model, tmp_path_factory.mktemp("fp32"), 4, seed=3, steps=8)
    return model, images


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precision_samples_stay_close_to_fp32(digits_fp32, tmp_path, name):
    model, ref = digits_fp32
    half = apply_precision(copy.deepcopy(model), resolve_precision(name, "cpu"), "cpu")
    images, _ = sample_dit(half, tmp_path, 4, seed=3, steps=8)
    psnr = psnr_from_mse(paired_mse(images, ref))
    assert PSNR_BOUND[name] < psnr < float("inf"), psnr  # inf would mean the run was not in half precision


def test_apply_precision_leaves_a_model_already_in_the_dtype_alone(monkeypatch):
    """sample.py -q of a Flux pipeline printed diffusers' "modules ... should be kept in float32 ... Casting directly
    with to()" (a new user's trial): diffusers warns about any model.to(dtype), fp32 to fp32 included. A model
    already in the dtype is not cast; one that is not is (mutations: always cast; never cast)."""
    from tests.models.tiny_t2i import BUILDERS

    model = BUILDERS["flux"]().transformer
    monkeypatch.setattr(model, "to", lambda *a, **k: pytest.fail("cast a float32 model to float32"))
    assert apply_precision(model, resolve_precision("fp32", "cpu"), "cpu") is model
    monkeypatch.undo()
    assert next(apply_precision(model, resolve_precision("bf16", "cpu"), "cpu").parameters()).dtype == torch.bfloat16
