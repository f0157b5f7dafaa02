"""The bytes of each Linear a quantize run selects, as the memory plan counts them: its fp32 weights, its VQ state
while soft and once hard, and what the artifact stores of it."""
import math
import re

from vq4dit.vq.apply import QKV_PATTERN


def nbytes(shape, dtype):
    import torch

    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def layer_sizes(model, include, codebooks, n):
    """{name: sizes} of the Linears `include` selects, quantized with CodebookConfig `codebooks` and n candidates
    while soft: weights, fp32 bytes, soft and hard in-memory VQ state, the artifact's stored bytes (codec specs) and
    its index and codebook bytes. A layer the run cannot cut into those codebooks is refused as the run refuses it
    (vq.layer.check_shape; with --bits, a layer no setting fits: jobs.allocation.check_fits)."""
    import torch
    from torch import nn

    from vq4dit.jobs.allocation import check_fits
    from vq4dit.vq.codecs import CODECS
    from vq4dit.vq.layer import check_shape
    from vq4dit.vq.packing import index_dtype

    pattern, qkv = re.compile(include), re.compile(QKV_PATTERN)
    index_bytes = torch.empty(0, dtype=index_dtype(codebooks.k)).element_size()
    out = {}
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) and pattern.search(name)):
            continue
        groups = 3 if codebooks.split_qkv and qkv.search(name) else 1
        if codebooks.bits is None:
            check_shape(name, m.in_features, m.out_features, codebooks.dim, groups,
                        None if codebooks.kmeans_init == "authors" else codebooks.k)
        else:
            check_fits(name, m, groups, codebooks.settings_text)
        meta = {"in_features": m.in_features, "out_features": m.out_features, "k": codebooks.k, "d": codebooks.dim,
                "n": n, "groups": groups, "bias": m.bias is not None}
        specs = CODECS["VQLinear"].tensor_specs(meta)
        subs = m.in_features * m.out_features // codebooks.dim
        fixed = groups * codebooks.k * codebooks.dim * 4 + (m.out_features * 4 if m.bias is not None else 0)
        out[name] = {"weights": m.in_features * m.out_features, "subs": subs, "n": n, "groups": groups, "fixed": fixed,
                     "fp": sum(p.numel() * 4 for p in m.parameters()),
                     "soft": subs * (n * index_bytes + n * 4 + 1) + fixed, "hard": subs * index_bytes + fixed,
                     "stored": sum(nbytes(*spec) for spec in specs.values()),
                     "index": nbytes(*specs["indices"]), "codebook": nbytes(*specs["codebook"])}
    return out
