"""Round-to-nearest scalar quantization per output channel: the baseline VQ4DiT is compared against.

Each output row gets an asymmetric uniform grid of 2^bits levels spanning [min, max] of that row.
The scale and the row minimum are stored in fp16 (rounded here, so the artifact is exact).
"""
import torch
from torch import nn

from vq4dit.vq.kernels.decode import tensor_key, workspace
from vq4dit.vq.packing import index_dtype
from vq4dit.vq.qlinear import QuantLinear

STAT_STORAGE_BITS = 16  # scale and minimum per output row, fp16


def rtn_quantize(w, bits):
    """w (out, in) -> integer codes (out, in) in [0, 2^bits - 1], fp16-exact scale (out, 1) and minimum (out, 1)."""
    levels = 2**bits - 1
    lo = w.amin(1, keepdim=True).half().float()
    hi = w.amax(1, keepdim=True)
    scale = ((hi - lo) / levels).clamp(min=1e-8).half().float()
    codes = torch.round((w - lo) / scale).clamp(0, levels).long()
    return codes, scale, lo


def rtn_dequantize(codes, scale, lo, dtype=torch.float32, out=None):
    """codes (out, in), scale and lo (out, 1) -> weight (out, in) in `dtype`, built in place in that one tensor:
    `out` (a contiguous tensor of out * in elements, e.g. a workspace buffer) when given, else a new one."""
    weight = torch.empty(codes.shape, dtype=dtype, device=codes.device) if out is None else out.view(codes.shape)
    return weight.copy_(codes).mul_(scale.to(dtype)).add_(lo.to(dtype))


class RTNLinear(QuantLinear):
    """A Linear whose weight is stored as `bits`-bit codes with a per-row scale and minimum; always hard."""

    def __init__(self, in_features, out_features, bits, bias=True, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=index_dtype(2**bits),
                                                  device=device))
        self.register_buffer("scale", torch.ones(out_features, 1, device=device))
        self.register_buffer("lo", torch.zeros(out_features, 1, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear, bits):
        w = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None, device=w.device)
        codes, scale, lo = rtn_quantize(w, bits)
        layer.codes.copy_(codes)
        layer.scale.copy_(scale)
        layer.lo.copy_(lo)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    @property
    def qweight(self):
        """The integer codes (out, in): see QuantLinear.qweight."""
        return self.codes

    def weight(self, dtype=None):
        """(out, in) weight in `dtype` (default: the scale's), decoded straight into that dtype."""
        return rtn_dequantize(self.codes, self.scale, self.lo, dtype or self.scale.dtype)

    def plan_key(self, dtype):
        """See QuantLinear.plan_key: scale and minimum (a plan holds them cast) and the codes tensor."""
        buffers = self._buffers
        return dtype, tensor_key(buffers["scale"]), tensor_key(buffers["lo"]), buffers["codes"].data_ptr()

    def decode_plan(self, dtype, device):
        """See QuantLinear.decode_plan: rtn_dequantize into the workspace, scale and minimum cast once."""
        weight = workspace("weight", self.out_features * self.in_features, dtype, device)
        codes, scale, lo = self.codes, self.scale.to(dtype), self.lo.to(dtype)
        return lambda: rtn_dequantize(codes, scale, lo, dtype, weight)

    def bits_per_weight(self, include_codebook=False):
        extra = 2 * STAT_STORAGE_BITS / self.in_features if include_codebook else 0.0
        return self.bits + extra

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, bias={self.bias is not None}"

