"""QuantLinear: the one contract every quantized Linear keeps (VQLinear, RTNLinear, and any later method's layer).

A QuantLinear stores its weight in some compact form and decodes it on the fly: `weight(dtype)` returns the (out, in)
weight in `dtype`, `forward` is F.linear with it (only this layer's decoded weight is alive meanwhile), `qweight` is
the stored (encoded) weight tensor, `is_hard` says whether the stored form is final (an artifact saves hard layers
only), and `bits_per_weight` is the storage cost. How a class is written to an artifact is its codec (vq/codecs.py).
"""
import torch.nn.functional as F
from torch import nn


class QuantLinear(nn.Module):
    in_features: int
    out_features: int
    is_hard = True  # a layer with a calibration-time (soft) form overrides this

    def weight(self, dtype=None):
        """(out, in) decoded weight in `dtype` (default: the layer's own storage dtype)."""
        raise NotImplementedError

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
        """F.linear with the weight decoded in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight(x.dtype), bias)
