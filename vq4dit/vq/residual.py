"""ResidualVQLinear: a Linear whose weight is the sum of S vector-quantized stages (residual, additive codebooks).

Stage s has its own codebooks (one per row group, k codewords of d weights) and one index per sub-vector; the
weight is sum_s C_s[i_s]. As held, the layer is a VQLinear of S x out rows (the stages stacked, stage-major) with
S x G codebooks (codebook s * G + g: stage s, row group g) whose S row blocks are summed. So the soft form (each
stage's sub-vectors with their own candidates and ratio logits), progressive selection, hardening, fp16 rounding
and what the calibration's Trainer reads (logits, codebook, bias, frozen) are VQLinear's, unchanged: the stages
train together in the same block walk.

Fitting (from_linear), in turn: stage 1 is k-means of the weight's sub-vectors, stage s + 1 k-means of what stages
1..s leave (W minus their sum), each sub-vector at the nearest codeword to its stage's target. Storage: S x
ceil(log2 k) / d index bits per weight and S codebooks per row group (vq/codecs.py).
"""
import torch
from torch import nn

from vq4dit.utils.errors import UserError
from vq4dit.vq.candidates import (
    candidates_around,
    hard_reconstruct,
    init_logits,
    nearest_codewords,
)
from vq4dit.vq.kernels.decode import gather_plan, workspace
from vq4dit.vq.kmeans import authors_codebook_size, kmeans
from vq4dit.vq.layer import CODEBOOK_STORAGE_BITS, VQLinear, check_shape
from vq4dit.vq.packing import index_bits
from vq4dit.vq.weighted_kmeans import diagonal_blocks, gptvq_assign, refit_codebook, weighted_kmeans


class ResidualVQLinear(VQLinear):
    """Residual VQ Linear of `stages` stages. The constructor builds an empty skeleton; use `from_linear`."""

    def __init__(self, in_features, out_features, codebook_size, dim, stages=2, num_candidates=2, groups=1,
                 bias=True, hard=False, device=None):
        if stages < 1:
            raise UserError(f"ResidualVQLinear: invalid stages={stages}: must be at least 1")
        check_shape("ResidualVQLinear", in_features, out_features, dim, groups)
        super().__init__(in_features, stages * out_features, codebook_size, dim, num_candidates, stages * groups,
                         bias=False, hard=hard, device=device)
        self.out_features, self.groups, self.stages = out_features, groups, stages
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear, spec, groups=1, seed=0, name="linear", soft=True):
        """The stages of linear.weight fitted in turn as the module docstring says (`spec`: a CodebookSpec with
        spec.stages stages; codebook s * G + g from k-means seed + s * G + g), then soft as VQLinear.from_linear
        (soften_) unless soft=False. kmeans_init "authors" clamps k as VQLinear.from_linear does."""
        k, dim = spec.codebook_size, spec.dim
        if spec.kmeans_init == "authors":
            k = authors_codebook_size(k, linear.out_features * linear.in_features // dim // groups)
        check_shape(name, linear.in_features, linear.out_features, dim, groups, k)
        w = linear.weight.detach().float()  # (out, in)
        layer = cls(linear.in_features, linear.out_features, k, dim, spec.stages, spec.candidates, groups,
                    bias=linear.bias is not None, hard=True, device=w.device)
        target = w.reshape(groups, -1, dim).clone()  # (G, M, d): what the stages so far leave of each sub-vector
        indices = []
        for s in range(spec.stages):
            for g in range(groups):
                j = s * groups + g
                codebook, _ = kmeans(target[g], k, iters=spec.kmeans_iters, seed=seed + j, init=spec.kmeans_init)
                index = nearest_codewords(target[g], codebook, 1)[0][:, 0]  # (M,)
                layer.codebook.data[j] = codebook
                target[g] -= codebook[index]
                indices.append(index)
        layer.indices.copy_(torch.cat(indices))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer.soften_(w, spec.candidates, spec.ratio_init) if soft else layer

    @torch.no_grad()
    def stage_targets(self, fp_weight):
        """(S, G, M, d): for each stage, what `fp_weight` (out, in) leaves once the other stages (hard, as now) are
        subtracted: the sub-vectors that stage alone should match."""
        w = fp_weight.detach().float().to(self.codebook.device).reshape(self.groups, -1, self.dim)  # (G, M, d)
        decoded = hard_reconstruct(self.codebook.data, self.indices).view(self.stages, self.groups, -1, self.dim)
        return w - decoded.sum(0) + decoded

    @torch.no_grad()
    def soften_(self, fp_weight, candidates=2, ratio_init="inverse_distance", keep=False):
        """Make a hard layer soft: each stage's sub-vectors get their current codeword as candidate 0 and argmax,
        then the codewords nearest to the stage's target (stage_targets), ratio logits from the distances
        (vq.candidates.candidates_around). A stage's nearest codeword depends on the other stages' codewords, so the
        soft layer always starts at the hard one's assignment (keep is implied); returns self."""
        if not self.is_hard:
            raise RuntimeError("soften_ needs a hard ResidualVQLinear")
        del keep  # always kept: see above
        targets = self.stage_targets(fp_weight).reshape(self.stages * self.groups, -1, self.dim)  # (S*G, M, d)
        current = self.indices.reshape(self.stages * self.groups, -1)  # (S*G, M)
        cands, logits = [], []
        for j in range(self.stages * self.groups):
            idx, dist = candidates_around(targets[j], self.codebook.data[j], current[j], candidates)
            cands.append(idx)
            logits.append(init_logits(dist, ratio_init))
        return self.set_soft_(torch.cat(cands), torch.cat(logits), candidates)

    @torch.no_grad()
    def fit_outputs_(self, fp_weight, h_full, seed):
        """Refit the hard stages to the layer's inputs (input moments h_full (in, in)), as vq.weighted_kmeans.gptvq
        fits one codebook: 1. each stage's codebook by input-weighted k-means of its target (stage_targets), in
        turn from its current codebook; 2. every stage's assignment in one GPTQ sweep (gptvq_assign with the
        stages' codebooks: each column group takes its stages' codewords in turn, and the error fed back is what
        they all leave); 3. each stage's codebook refit in turn to the output error for those assignments. The
        stages then minimise tr(dW H dW^T) together; returns self."""
        h = h_full.to(self.codebook.device)
        per = self.indices.numel() // (self.stages * self.groups)  # M: sub-vectors per codebook

        def refit_stages(fit):
            for s in range(self.stages):
                rows = self.stage_targets(fp_weight)[s].reshape(self.groups, -1, self.in_features)  # (G, out/G, in)
                for g in range(self.groups):
                    j = s * self.groups + g
                    self.codebook[j] = fit(rows[g], j, self.indices[j * per:(j + 1) * per].long())

        blocks = diagonal_blocks(h, self.dim)
        refit_stages(lambda rows, j, _: weighted_kmeans(rows, blocks, self.codebook_size, self.dim, seed=seed + j,
                                                        start=self.codebook[j])[0])
        w = fp_weight.detach().float().to(self.codebook.device).reshape(self.groups, -1, self.in_features)
        for g in range(self.groups):
            js = [s * self.groups + g for s in range(self.stages)]
            index = gptvq_assign(w[g], h, self.codebook[js], self.dim)  # (S, M)
            for s, j in enumerate(js):
                self.indices[j * per:(j + 1) * per] = index[s].to(self.indices.dtype)
        refit_stages(lambda rows, j, index: refit_codebook(rows, h, self.codebook[j], index, self.dim))
        return self

    def decode_plan(self, dtype, device):
        """See QuantLinear.decode_plan: the stages gathered into one workspace slot (one gather per codebook), then
        summed into the weight's."""
        n = self.out_features * self.in_features
        stacked = workspace("stages", self.stages * n, dtype, device)
        gather = gather_plan(self.codebook.detach().to(dtype), self.indices, stacked.view(-1, self.dim))
        parts = stacked.view(self.stages, self.out_features, self.in_features)
        weight = workspace("weight", n, dtype, device).view(self.out_features, self.in_features)

        def run():
            gather()
            return torch.sum(parts, 0, out=weight)

        return run

    @property
    def has_fused_kernel(self):
        return False  # the fused Triton kernel decodes one stage

    def weight(self, dtype=None):
        """(out, in) weight in `dtype` (default: the codebook's), a new tensor: the sum of the stages' decodes, each
        decoded as VQLinear.weight decodes (gather without autograd, index_select's fixed-order backward with it)."""
        return self.subvectors(dtype).reshape(self.stages, self.out_features, self.in_features).sum(0)

    def bits_per_weight(self, include_codebook=False):
        bits = self.stages * index_bits(self.codebook_size) / self.dim
        if include_codebook:
            codebook_bits = self.stages * self.groups * self.codebook_size * self.dim * CODEBOOK_STORAGE_BITS
            bits += codebook_bits / (self.in_features * self.out_features)
        return bits

    def extra_repr(self):
        return f"{super().extra_repr()}, stages={self.stages}"


def layer_class(spec):
    """The layer class a CodebookSpec builds: ResidualVQLinear for spec.stages > 1, else VQLinear."""
    return ResidualVQLinear if spec.stages > 1 else VQLinear
