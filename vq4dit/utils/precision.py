"""Inference precision: which dtype the network runs in and whether CUDA matmuls may use TF32.

fp32: exact float32. tf32: float32 weights and activations, CUDA matmuls and convolutions in TF32 (what the
official DiT sampler enables); on a CPU it is plain fp32. bf16 / fp16: the network (and the decode of quantized
weights) runs in that dtype; timestep features, guidance and the sampler's arithmetic stay float32 (the sampler
casts the model input down and its output back up). Casting keeps integer buffers (codeword indices) as they are.
"""
import logging
from dataclasses import dataclass

import torch

from vq4dit.utils.errors import UserError, error_detail

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # one of PRECISIONS, after resolving the default and CPU fallbacks
    dtype: torch.dtype  # the network's parameter and activation dtype
    tf32: bool  # CUDA matmuls / convolutions in TF32


def default_precision(device):
    """tf32 on CUDA (as the official DiT sampler), fp32 elsewhere."""
    return "tf32" if str(device).startswith("cuda") else "fp32"


def _check_half_on_cpu(dtype):
    """UserError when this torch build cannot run a Linear, a LayerNorm and attention in `dtype` on the CPU."""
    x = torch.randn(1, 2, 4, 8, dtype=dtype)
    try:
        torch.nn.functional.scaled_dot_product_attention(x, x, x)
        torch.nn.functional.layer_norm(torch.nn.functional.linear(x, torch.randn(8, 8, dtype=dtype)), (8,))
    except RuntimeError as e:
        name = "fp16" if dtype == torch.float16 else "bf16"
        raise UserError(f"--precision {name}: this torch build cannot run {dtype} on the CPU "
                        f"({error_detail(e)}); use --precision fp32") from None


def resolve_precision(name, device):
    """A Precision for --precision `name` (None: the device's default) on `device` ('cpu', 'cuda', 'cuda:N')."""
    device = str(device)
    name = name or default_precision(device)
    if name not in PRECISIONS:
        raise UserError(f"--precision {name}: use one of {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if name == "tf32" and not cuda:
        return Precision("fp32", torch.float32, False)  # TF32 is a CUDA matmul mode; a CPU computes fp32
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                        "use fp16, tf32 or fp32")
    if name in ("bf16", "fp16") and not cuda:
        _check_half_on_cpu(_DTYPES[name])
    return Precision(name, _DTYPES[name], name == "tf32")


def set_tf32(enabled):
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions, process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_precision(model, precision, device):
    """Cast the floating parameters and buffers of `model` to precision.dtype (integer buffers stay) and, on
    CUDA, set the TF32 flags; returns the model."""
    if str(device).startswith("cuda"):
        set_tf32(precision.tf32)
    logger.info("precision %s (%s%s)", precision.name, str(precision.dtype).removeprefix("torch."),
                ", TF32 matmuls" if precision.tf32 else "")
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.dtype == precision.dtype for t in tensors if t.is_floating_point()):
        return model  # nothing to cast (diffusers warns about any model.to(dtype) of a Flux transformer, even -q)
    return model.to(precision.dtype)


def compute_dtype(model):
    """The dtype a model computes in: that of its first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def update_autocast(step_dtype, device):
    """The autocast context of a calibration update's forward: bf16 matmuls under torch.autocast for step_dtype
    "bf16" (parameters, gradients and anything outside the autocast list stay float32), nothing for "fp32"."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=step_dtype == "bf16")
