"""VQLinear: a Linear layer whose weight is a vector-quantized codebook lookup (soft or hard assignment).

Sub-vectors are d consecutive input weights of one output row, ordered as W.reshape(-1, d) (N = out * in / d).
With groups > 1 the output rows are split into `groups` equal chunks (e.g. q, k, v of a fused qkv), each with
its own codebook; the N/groups sub-vectors of chunk g index codebook[g].

Soft mode (calibration): each sub-vector holds n candidate codewords and learnable ratio logits; the
reconstruction is the ratio-weighted average of its candidates. Hard mode (deployment): one index per
sub-vector.
"""
import logging
from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.utils.errors import UserError
from vq4dit.vq.candidates import (
    candidates_around,
    hard_reconstruct,
    init_logits,
    masked_ratios,
    nearest_codewords,
    soft_reconstruct,
)
from vq4dit.vq.kernels.decode import gather_codewords, gather_plan, tensor_key, workspace
from vq4dit.vq.kernels.select import fused_supports
from vq4dit.vq.kmeans import authors_codebook_size, kmeans
from vq4dit.vq.packing import index_bits, index_dtype
from vq4dit.vq.qlinear import QuantLinear

logger = logging.getLogger(__name__)

CODEBOOK_STORAGE_BITS = 16  # the artifact stores codebooks in fp16


def check_shape(name, in_features, out_features, dim, groups, codebook_size=None):
    """Raise a UserError when a (in, out) layer cannot be cut into d-sub-vectors / row groups / k clusters."""
    if in_features % dim:
        raise UserError(f"layer {name}: in_features={in_features} is not divisible by dim={dim}; "
                        f"choose a dim that divides {in_features}")
    if out_features % groups:
        raise UserError(f"layer {name}: out_features={out_features} is not divisible by groups={groups}")
    per_group = out_features * in_features // dim // groups
    if codebook_size is not None and per_group < codebook_size:
        raise UserError(f"layer {name}: only {per_group} sub-vectors per codebook, fewer than "
                        f"codebook_size={codebook_size}; use a smaller codebook_size or dim")


@dataclass(frozen=True)
class CodebookSpec:
    """How VQLinear.from_linear builds a layer: k = codebook_size codewords of dim weights per codebook, fitted by
    kmeans_iters Lloyd iterations from kmeans_init "fast" or "authors" (vq.kmeans.kmeans; "authors" clamps k for a
    small layer); while soft, `candidates` codewords per sub-vector whose ratios start as ratio_init
    (vq.candidates.init_logits); stages > 1: that many residual codebooks whose codewords add (vq.residual)."""

    codebook_size: int
    dim: int
    candidates: int = 2
    kmeans_iters: int = 100
    kmeans_init: str = "fast"
    ratio_init: str = "inverse_distance"
    stages: int = 1


class VQLinear(QuantLinear):
    """Vector-quantized Linear. The constructor builds an empty skeleton; use `from_linear` to quantize."""

    def __init__(self, in_features, out_features, codebook_size, dim, num_candidates=2, groups=1, bias=True,
                 hard=False, device=None):
        super().__init__()
        check_shape("VQLinear", in_features, out_features, dim, groups)
        self.in_features, self.out_features = in_features, out_features
        self.codebook_size, self.dim, self.num_candidates, self.groups = codebook_size, dim, num_candidates, groups
        n_sub = out_features * in_features // dim
        self.codebook = nn.Parameter(torch.zeros(groups, codebook_size, dim, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        dtype = index_dtype(codebook_size)  # uint8 for k <= 256
        if hard:
            self.register_buffer("indices", torch.zeros(n_sub, dtype=dtype, device=device))
        else:
            self.register_buffer("candidates", torch.zeros(n_sub, num_candidates, dtype=dtype, device=device))
            self.logits = nn.Parameter(torch.zeros(n_sub, num_candidates, device=device))
            self.register_buffer("frozen", torch.zeros(n_sub, dtype=torch.bool, device=device))

    @classmethod
    def from_linear(cls, linear, spec, groups=1, seed=0, name="linear", soft=True):
        """k-means codebook(s) of linear.weight as `spec` (a CodebookSpec) says, codebook g from seed + g, then the
        spec.candidates nearest codewords per sub-vector (soft), or only the nearest one (soft=False: a hard layer,
        1 byte per sub-vector at k <= 256 instead of about 11 at n = 2; `soften_` gives it its candidates later,
        with the very values soft=True gives now).

        kmeans_init "authors" clamps the codebook size of a small layer (vq.kmeans.authors_codebook_size), and the
        layer then carries that smaller k.
        """
        codebook_size, dim, candidates = spec.codebook_size, spec.dim, spec.candidates
        if spec.kmeans_init == "authors":
            per_group = linear.out_features * linear.in_features // dim // groups
            clamped = authors_codebook_size(codebook_size, per_group)
            if clamped != codebook_size:
                logger.info("layer %s: %d sub-vectors per codebook, k clamped from %d to %d (kmeans_init authors)",
                            name, per_group, codebook_size, clamped)
            codebook_size = clamped
        check_shape(name, linear.in_features, linear.out_features, dim, groups, codebook_size)
        w = linear.weight.detach().float()  # (out, in)
        layer = cls(linear.in_features, linear.out_features, codebook_size, dim, candidates, groups,
                    bias=linear.bias is not None, hard=True, device=w.device)
        subs = w.reshape(groups, -1, dim)  # (G, N/G, d): group g = output rows [g*out/G, (g+1)*out/G)
        for g in range(groups):
            layer.codebook.data[g], _ = kmeans(subs[g], codebook_size, iters=spec.kmeans_iters, seed=seed + g,
                                               init=spec.kmeans_init)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        if soft:
            return layer.soften_(w, candidates, spec.ratio_init)
        nearest = [nearest_codewords(subs[g], layer.codebook.data[g], 1)[0][:, 0] for g in range(groups)]
        layer.indices.copy_(torch.cat(nearest))
        return layer

    @torch.no_grad()
    def assign_(self, codebook, indices):
        """Set a hard layer's codebook (G, k, d) and indices (N,) (e.g. an output-aware fit); returns self."""
        if not self.is_hard:
            raise RuntimeError("assign_ needs a hard VQLinear")
        self.codebook.copy_(codebook)
        self.indices.copy_(indices)
        return self

    @torch.no_grad()
    def soften_(self, fp_weight, candidates=2, ratio_init="inverse_distance", keep=False):
        """Make a hard layer soft: each sub-vector of `fp_weight` (out, in) gets its `candidates` nearest codewords
        and ratio logits from their distances (ratio_init), as at quantization; returns self. keep=True: the
        layer's current index is candidate 0 and its argmax (vq.candidates.candidates_around), so the soft layer
        starts from the hard one's assignment rather than from the nearest codewords."""
        if not self.is_hard:
            raise RuntimeError("soften_ needs a hard VQLinear")
        subs = fp_weight.detach().float().to(self.codebook.device).reshape(self.groups, -1, self.dim)  # (G, N/G, d)
        current = self.indices.reshape(self.groups, -1)  # (G, N/G)
        cands, logits = [], []
        for g in range(self.groups):
            if keep:
                idx, dist = candidates_around(subs[g], self.codebook.data[g], current[g], candidates)
            else:
                idx, dist = nearest_codewords(subs[g], self.codebook.data[g], candidates)
            cands.append(idx)
            logits.append(init_logits(dist, ratio_init))
        return self.set_soft_(torch.cat(cands), torch.cat(logits), candidates)

    def set_soft_(self, candidates, logits, num_candidates):
        """Turn this hard layer soft in place: its (N, n) candidate indices and ratio logits replace its indices
        (num_candidates: n as asked), with no sub-vector frozen yet."""
        del self.indices
        self.num_candidates = num_candidates
        self.register_buffer("candidates", candidates.to(index_dtype(self.codebook_size)))
        self.logits = nn.Parameter(logits)
        self.register_buffer("frozen", torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device))
        return self

    @property
    def is_hard(self):
        return "indices" in self._buffers

    def plan_key(self, dtype):
        """See QuantLinear.plan_key: the codebook (a plan holds it cast) and the indices tensor (read each call)."""
        return dtype, tensor_key(self._parameters["codebook"]), self._buffers["indices"].data_ptr()

    def decode_plan(self, dtype, device):
        """See QuantLinear.decode_plan: one gather per codebook into the workspace (vq.kernels.decode.gather_plan)."""
        n = self.out_features * self.in_features
        buffer = workspace("weight", n, dtype, device)
        gather = gather_plan(self.codebook.detach().to(dtype), self.indices, buffer.view(-1, self.dim))
        weight = buffer.view(self.out_features, self.in_features)

        def run():
            gather()
            return weight

        return run

    @property
    def has_fused_kernel(self):
        """The fused Triton kernel (vq/kernels/triton_vq.py) handles this layer's sub-vector size."""
        return fused_supports(self.dim)

    def fused_forward(self, x):
        """x (..., in) -> (..., out) by the fused dequantize-matmul kernel (needs triton): see QuantLinear."""
        from vq4dit.vq.kernels.triton_vq import vq_linear  # triton is optional: imported only where it runs

        bias = None if self.bias is None else self.bias.to(x.dtype)
        return vq_linear(x, self.codebook, self.indices, bias)

    @property
    def qweight(self):
        """The stored form of the weight (indices, or soft candidates): see QuantLinear.qweight."""
        return self.indices if self.is_hard else self.candidates

    def ratios(self):
        """(N, n) candidate ratios: softmax(logits), frozen rows one-hot at their argmax."""
        if self.is_hard:
            raise RuntimeError("a hard VQLinear has no ratios")
        return masked_ratios(self.logits, self.frozen)

    def weight(self, dtype=None):
        """(out, in) reconstructed weight in `dtype` (default: the codebook's), a new tensor.

        The small codebook is cast first and the lookup writes `dtype` directly: a bf16 forward never holds a
        float32 copy of the weight. Without autograd the hard lookup is one gather per codebook
        (vq.kernels.decode.gather_codewords; an inference forward decodes by its plan instead, see QuantLinear); a
        codebook under training, or torch.compile tracing, uses index_select's fixed-order backward
        (hard_reconstruct), a pure function of the tensors.
        """
        return self.subvectors(dtype).reshape(self.out_features, self.in_features)

    def subvectors(self, dtype=None):
        """(N, d) the decoded sub-vectors in `dtype`, row-major over the stored rows (see weight)."""
        codebook = self.codebook if dtype in (None, self.codebook.dtype) else self.codebook.to(dtype)
        gather = not (torch.is_grad_enabled() and codebook.requires_grad) and not torch.compiler.is_compiling()
        if self.is_hard and gather:
            return gather_codewords(codebook.detach(), self.indices)
        if self.is_hard:
            return hard_reconstruct(codebook, self.indices)
        return soft_reconstruct(codebook, self.candidates, self.ratios().to(codebook.dtype))

    @torch.no_grad()
    def freeze_confident_(self, threshold=0.99):
        """Freeze every sub-vector whose largest ratio exceeds `threshold` (on the device: nothing is read back)."""
        if self.is_hard:
            raise RuntimeError("freeze_confident_ needs a soft VQLinear")
        self.frozen |= torch.softmax(self.logits, dim=1).amax(1) > threshold

    def frozen_fraction(self):
        """The fraction of frozen sub-vectors of a soft layer, a 0-d float32 tensor on its device."""
        return self.frozen.float().mean()

    def selected_fraction(self):
        return 1.0 if self.is_hard else self.frozen_fraction().item()

    @torch.no_grad()
    def harden(self):
        """Keep each sub-vector's highest-ratio candidate; drops logits, candidates and frozen."""
        if self.is_hard:
            return self
        choice = self.ratios().argmax(1, keepdim=True)  # (N, 1)
        indices = self.candidates.gather(1, choice).squeeze(1)  # (N,)
        del self.logits, self.candidates, self.frozen
        self.register_buffer("indices", indices)
        return self

    @torch.no_grad()
    def round_codebook_(self):
        """Round the codebook to fp16-representable values, so the saved fp16 codebook equals this one."""
        self.codebook.copy_(self.codebook.half().float())
        return self

    def bits_per_weight(self, include_codebook=False):
        bits = index_bits(self.codebook_size) / self.dim
        if include_codebook:
            codebook_bits = self.groups * self.codebook_size * self.dim * CODEBOOK_STORAGE_BITS
            bits += codebook_bits / (self.in_features * self.out_features)
        return bits

    def extra_repr(self):
        mode = "hard" if self.is_hard else f"soft n={self.num_candidates}"
        return (f"in={self.in_features}, out={self.out_features}, k={self.codebook_size}, d={self.dim}, "
                f"groups={self.groups}, {mode}, bias={self.bias is not None}")
