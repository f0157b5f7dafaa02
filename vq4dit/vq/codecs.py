"""How each quantized layer class is stored in an artifact: a registry of codecs keyed by class name.

A codec turns a hard layer into a few compact tensors (bit-packed indices, fp16 tables, fp32 bias) and back.
`tensor_specs(meta)` says exactly which tensors (shape, dtype) a layer with hyperparameters `meta` stores; the
loader checks files against it and the size report computes sizes from it, so both use the same bit counts.
To support another layer class, write its five functions and call `register_codec`.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from vq4dit.vq.layer import VQLinear
from vq4dit.vq.packing import index_bits, pack_bits, packed_nbytes, unpack_bits
from vq4dit.vq.residual import ResidualVQLinear
from vq4dit.vq.rtn import RTNLinear


@dataclass(frozen=True)
class LayerCodec:
    cls: type
    describe: Callable  # layer -> meta (JSON-able dict of constructor hyperparameters)
    tensor_specs: Callable  # meta -> {suffix: (shape tuple, torch dtype)} as stored in the file
    pack: Callable  # layer -> {suffix: tensor} matching tensor_specs
    build: Callable  # meta -> hard skeleton layer (zeros)
    unpack: Callable  # (meta, {suffix: tensor}) -> the skeleton's state dict
    prepare: Callable = lambda layer: None  # in place, before packing: make the layer exactly representable


CODECS = {}


def register_codec(codec):
    CODECS[codec.cls.__name__] = codec


def codec_for(module):
    """The codec of a quantized module, or None for any other module."""
    return CODECS.get(type(module).__name__)


def _bias_spec(meta):
    return {"bias": ((meta["out_features"],), torch.float32)} if meta["bias"] else {}


# --- VQLinear: indices at ceil(log2 k) bits each, fp16 codebooks (G, k, d), fp32 bias -------------------------

def _vq_describe(layer):
    return {"in_features": layer.in_features, "out_features": layer.out_features, "k": layer.codebook_size,
            "d": layer.dim, "n": layer.num_candidates, "groups": layer.groups, "bias": layer.bias is not None}


def _vq_specs(meta, stages=1):
    n_sub = stages * meta["out_features"] * meta["in_features"] // meta["d"]
    return {"indices": ((packed_nbytes(n_sub, index_bits(meta["k"])),), torch.uint8),
            "codebook": ((stages * meta["groups"], meta["k"], meta["d"]), torch.float16), **_bias_spec(meta)}


def _vq_pack(layer):
    out = {"indices": pack_bits(layer.indices, index_bits(layer.codebook_size)), "codebook": layer.codebook.half()}
    if layer.bias is not None:
        out["bias"] = layer.bias.float()
    return out


def _vq_build(meta):
    return VQLinear(meta["in_features"], meta["out_features"], meta["k"], meta["d"], meta["n"], meta["groups"],
                    bias=meta["bias"], hard=True)


def _vq_unpack(meta, packed, stages=1):
    n_sub = stages * meta["out_features"] * meta["in_features"] // meta["d"]
    indices = unpack_bits(packed["indices"], index_bits(meta["k"]), n_sub)
    if n_sub and int(indices.max()) >= meta["k"]:  # possible when k is not a power of two: a corrupt file
        raise ValueError(f"codeword index {int(indices.max())} out of range for k={meta['k']}")
    state = {"indices": indices, "codebook": packed["codebook"].float()}
    if meta["bias"]:
        state["bias"] = packed["bias"]
    return state


register_codec(LayerCodec(VQLinear, _vq_describe, _vq_specs, _vq_pack, _vq_build, _vq_unpack,
                          prepare=VQLinear.round_codebook_))


# --- ResidualVQLinear: VQLinear's tensors with its S stages stacked (stage-major): S x N indices at ceil(log2 k)
# bits each in one packed tensor, fp16 codebooks (S x G, k, d), fp32 bias -------------------------------------

def _residual_describe(layer):
    return {**_vq_describe(layer), "stages": layer.stages}


def _residual_build(meta):
    return ResidualVQLinear(meta["in_features"], meta["out_features"], meta["k"], meta["d"], meta["stages"], meta["n"],
                            meta["groups"], bias=meta["bias"], hard=True)


register_codec(LayerCodec(ResidualVQLinear, _residual_describe, lambda meta: _vq_specs(meta, meta["stages"]),
                          _vq_pack, _residual_build, lambda meta, packed: _vq_unpack(meta, packed, meta["stages"]),
                          prepare=VQLinear.round_codebook_))


# --- RTNLinear: codes at `bits` bits each, fp16 per-row scale and minimum, fp32 bias ----------------------------

def _rtn_describe(layer):
    return {"in_features": layer.in_features, "out_features": layer.out_features, "bits": layer.bits,
            "bias": layer.bias is not None}


def _rtn_specs(meta):
    out_f, in_f = meta["out_features"], meta["in_features"]
    return {"codes": ((packed_nbytes(out_f * in_f, meta["bits"]),), torch.uint8),
            "scale": ((out_f, 1), torch.float16), "lo": ((out_f, 1), torch.float16), **_bias_spec(meta)}


def _rtn_pack(layer):
    out = {"codes": pack_bits(layer.codes.reshape(-1), layer.bits), "scale": layer.scale.half(),
           "lo": layer.lo.half()}
    if layer.bias is not None:
        out["bias"] = layer.bias.float()
    return out


def _rtn_build(meta):
    return RTNLinear(meta["in_features"], meta["out_features"], meta["bits"], bias=meta["bias"])


def _rtn_unpack(meta, packed):
    out_f, in_f = meta["out_features"], meta["in_features"]
    state = {"codes": unpack_bits(packed["codes"], meta["bits"], out_f * in_f).reshape(out_f, in_f),
             "scale": packed["scale"].float(), "lo": packed["lo"].float()}
    if meta["bias"]:
        state["bias"] = packed["bias"]
    return state


register_codec(LayerCodec(RTNLinear, _rtn_describe, _rtn_specs, _rtn_pack, _rtn_build, _rtn_unpack))
