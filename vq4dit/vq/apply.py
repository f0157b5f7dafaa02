"""Replace the nn.Linear layers of a model selected by a name pattern with quantized layers (one walk for all)."""
import logging
import re
import zlib

import torch
from torch import nn
from tqdm import tqdm

from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError
from vq4dit.vq.kmeans import authors_codebook_size
from vq4dit.vq.layer import check_shape
from vq4dit.vq.residual import layer_class
from vq4dit.vq.rtn import RTNLinear

logger = logging.getLogger(__name__)

BLOCK_LINEARS = r"^blocks\.\d+\."  # in a DiT: qkv, proj, fc1, fc2 and adaLN_modulation.1 of every block
QKV_PATTERN = r"\.qkv$"  # the fused q, k, v Linear that split_qkv splits


def layer_seed(seed, name):
    """A per-layer seed from (seed, qualified name): results do not depend on the order layers are visited."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_linears(model, include, make, desc="quantize", progress=True):
    """Replace every nn.Linear whose qualified name matches the regex `include` by make(name, linear) (a
    QuantLinear); returns {name: layer} in module order. The one walk over a model's Linears, for every method."""
    pattern = re.compile(include)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)]
    if not targets:
        raise UserError(f"include pattern {include!r} matches no nn.Linear of the model")
    out = {}
    for name, linear in tqdm(targets, desc=desc, unit="layer", disable=not progress):
        out[name] = make(name, linear)
        set_submodule(model, name, out[name])
    return out


def quantize_linears_rtn(model, bits, include=BLOCK_LINEARS, progress=False):
    """Round-to-nearest per output channel (vq/rtn.py) for the Linears `include` selects; returns {name: RTNLinear}."""
    return replace_linears(model, include, lambda name, linear: RTNLinear.from_linear(linear, bits), "rtn", progress)


def quantize_linears(model, spec, include=BLOCK_LINEARS, split_qkv=False, seed=0, progress=True, soft=True,
                     specs=None):
    """Replace every nn.Linear whose qualified name matches `include` by a VQLinear (a vq.residual.ResidualVQLinear
    for spec.stages > 1) built as `spec` (a vq.layer.CodebookSpec) says, from a per-layer seed (layer_seed);
    returns {name: VQLinear}. specs: {name: CodebookSpec} for layers built otherwise (a --bits allocation,
    jobs/allocation.py).

    soft: every layer gets its candidate sets and ratio logits now; soft=False keeps them hard (nearest codeword)
    until calibration softens them one block at a time (VQLinear.soften_), which at n = 2 holds 0.25 instead of
    2.75 bytes per weight for the blocks not in calibration.

    qkv: by default (split_qkv=False) a fused qkv Linear is one layer with one codebook, like every other layer
    (one codebook per nn.Linear is the simplest rule and what the model's module structure gives). With
    split_qkv=True, layers matching QKV_PATTERN get groups=3: q, k and v rows each get their own codebook,
    which is what the paper's size figures assume (196 codebooks for DiT-XL/2 instead of 140).
    All shapes are checked before any k-means runs, so a bad `dim` fails at once. spec.kmeans_init "authors"
    clamps k per layer instead of refusing a layer with fewer than k sub-vectors.
    """
    pattern, qkv = re.compile(include), re.compile(QKV_PATTERN)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)]
    groups = {name: 3 if split_qkv and qkv.search(name) else 1 for name, _ in targets}
    specs = {name: (specs or {}).get(name, spec) for name, _ in targets}
    for name, m in targets:
        check_shape(name, m.in_features, m.out_features, specs[name].dim, groups[name],
                    None if spec.kmeans_init == "authors" else specs[name].codebook_size)

    owner = dict(zip(groups, distributed.owners([m.in_features * m.out_features for _, m in targets],
                                                distributed.size())))

    shared, weights = distributed.active(), {}

    def make(name, linear):
        if shared:
            weights[name] = linear.weight
        if owner[name] != distributed.rank():  # under torchrun: another process runs this layer's k-means
            return unfitted(linear, specs[name], groups[name])
        return layer_class(specs[name]).from_linear(linear, specs[name], groups=groups[name],
                                                    seed=layer_seed(seed, name), name=name, soft=soft and not shared)

    out = replace_linears(model, include, make, "k-means", progress)
    if shared:
        share_hard_([out[name] for name in groups], [owner[name] for name in groups])
        for name, layer in out.items():
            if soft:  # what from_linear(soft=True) gives
                layer.soften_(weights[name], specs[name].candidates, specs[name].ratio_init)
    logger.info("quantized %d linear layers (k=%d, d=%d, n=%d, split_qkv=%s; %d with their own k and d)", len(out),
                spec.codebook_size, spec.dim, spec.candidates, split_qkv,
                sum(s != spec for s in specs.values()))
    return out


def unfitted(linear, spec, groups):
    """A hard VQLinear (ResidualVQLinear for spec.stages > 1) of `linear`'s shape and bias, its codebook and
    indices still to come (from the process that fits them: share_hard_); the codebook size from_linear would give
    (kmeans_init "authors" clamps it)."""
    k = spec.codebook_size
    if spec.kmeans_init == "authors":
        k = authors_codebook_size(k, linear.out_features * linear.in_features // spec.dim // groups)
    stages = {"stages": spec.stages} if spec.stages > 1 else {}  # a ResidualVQLinear's (vq.residual.layer_class)
    layer = layer_class(spec)(linear.in_features, linear.out_features, k, spec.dim, num_candidates=spec.candidates,
                              groups=groups, bias=linear.bias is not None, hard=True, device=linear.weight.device,
                              **stages)
    if linear.bias is not None:
        layer.bias.data.copy_(linear.bias.detach().float())
    return layer


@torch.no_grad()
def share_hard_(layers, owner):
    """Under torchrun: the codebook and indices of each hard VQLinear of `layers` from the rank that fitted it
    (`owner`, one rank per layer), on every rank. One process: nothing to do."""
    for layer, r in zip(layers, owner):
        distributed.broadcast_(layer.codebook.data, r)
        distributed.broadcast_(layer.indices, r)
