"""QuantLinear: the one contract every quantized Linear keeps (VQLinear, RTNLinear, and any later method's layer).

A QuantLinear stores its weight in some compact form and decodes it on the fly: `weight(dtype)` returns the
(out, in) weight in `dtype` as a new tensor, `forward` is F.linear with it, `qweight` is the stored (encoded) weight
tensor, `is_hard` says whether the stored form is final (an artifact saves hard layers only), and `bits_per_weight`
is the storage cost. How a class is written to an artifact is its codec (vq/codecs.py).

Inference (no autograd, not under torch.compile) decodes a hard layer by its decode plan into this thread's
workspace buffer (vq/kernels/decode.py), one buffer for all layers, grown to the largest: no allocation, no page
faults and little Python per call, and the model holds its compact form plus that one buffer. With autograd on,
the decoded weight is a fresh tensor (autograd may keep it for the backward). On CUDA, a layer with a fused
dequantize-matmul kernel (`fused_forward`) uses it where vq/kernels/select.py says it is faster.
"""
import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.vq.kernels.decode import planned_weight
from vq4dit.vq.kernels.select import use_fused


class QuantLinear(nn.Module):
    in_features: int
    out_features: int
    is_hard = True  # a layer with a calibration-time (soft) form overrides this
    has_fused_kernel = False  # True: fused_forward computes the hard layer's forward on CUDA

    def weight(self, dtype=None):
        """(out, in) decoded weight in `dtype` (default: the layer's own storage dtype), a new tensor."""
        raise NotImplementedError

    def plan_key(self, dtype):
        """What a decode plan of this hard layer for `dtype` depends on (vq.kernels.decode.planned_weight): the
        dtype and tensor_key of each tensor the plan reads or caches a copy of."""
        raise NotImplementedError

    def decode_plan(self, dtype, device):
        """A function of no arguments that decodes this hard layer's (out, in) weight in `dtype` into the
        workspace (vq.kernels.decode.workspace) and returns it; see planned_weight."""
        raise NotImplementedError

    def fused_forward(self, x):
        """x (..., in) -> (..., out) by a fused dequantize-matmul kernel, or None where the layer has none."""
        return None

    @property
    def qweight(self):
        """The stored (encoded) weight tensor, e.g. indices or integer codes. PEFT, wrapping a layer in a LoRA
        layer, places the LoRA on the device of the base layer's `qweight` (the name GPTQ layers give theirs), and
        tries `weight` only without one: here `weight` is the decoding method (vq/lora.py)."""
        raise NotImplementedError

    def bits_per_weight(self, include_codebook=False):
        """Stored bits per weight: indices or codes only, or with the per-layer tables (codebooks, scales)."""
        raise NotImplementedError

    def forward(self, x):
        """F.linear with the weight decoded in x's dtype (into the shared workspace buffer at inference), or the
        fused kernel where it is chosen."""
        inference = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if inference and use_fused(self, x):
            return self.fused_forward(x)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:  # .to of a tensor already in the dtype still costs ~4 us
            bias = bias.to(x.dtype)
        if inference and self.is_hard:
            return F.linear(x, planned_weight(self, x.dtype, x.device), bias)
        return F.linear(x, self.weight(x.dtype), bias)
