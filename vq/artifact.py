"""Quantized-model artifacts: a directory with model.safetensors, quant_config.json and config.yaml.

- model.safetensors: per quantized layer the compact tensors of its codec (vq/codecs.py), named
  "<layer>.<suffix>"; every other state-dict tensor of the model in fp32.
- quant_config.json: format_version, base model spec, per-layer class and hyperparameters, bits per weight, and
  the shape and dtype of every tensor in model.safetensors plus the file's size. It is written last, so its
  presence marks a complete artifact (it is removed first when an existing artifact is overwritten).
- config.yaml: the resolved quantization config, for the record.
"""
import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.loading import DiTSpec
from utils.errors import UserError, check_finite
from utils.fileio import atomic_path, write_text_atomic
from vq.apply import set_submodule
from vq.codecs import CODECS, codec_for

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE, QUANT_FILE, CONFIG_FILE = "model.safetensors", "quant_config.json", "config.yaml"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8, "int64": torch.int64}


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def quantized_layers(model):
    """{qualified name: (module, codec)} for every module of a registered quantized class."""
    return {name: (m, codec_for(m)) for name, m in model.named_modules() if codec_for(m) is not None}


def save_quantized(model, spec, out_dir, config):
    """Write `model` (every quantized layer hard) as an artifact directory; returns the quant_config dict.

    Codebooks are first rounded in place to what the file stores (fp16), and every layer's packed tensors are
    decoded again and compared with the layer, so the in-memory model equals the one load_quantized returns.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    layers = quantized_layers(model)
    if not layers:
        raise UserError("save_quantized: the model has no quantized layers; quantize it first")
    soft = [name for name, (m, _) in layers.items() if not m.is_hard]
    if soft:
        raise UserError(f"save_quantized: {len(soft)} quantized layers are still soft (first: {soft[0]}); "
                        f"call harden() on every layer before saving")
    tensors, layer_entries = {}, {}
    for name, (m, codec) in layers.items():
        codec.prepare(m)
        meta = codec.describe(m)
        packed = codec.pack(m)
        decoded, own = codec.unpack(meta, packed), m.state_dict()
        if decoded.keys() != own.keys() or not all(torch.equal(decoded[k].to(own[k]), own[k]) for k in own):
            raise RuntimeError(f"layer {name}: packed tensors do not decode to the layer's state exactly")
        tensors.update({f"{name}.{suffix}": t.detach().contiguous().cpu() for suffix, t in packed.items()})
        layer_entries[name] = {"class": type(m).__name__, **meta, "bits_per_weight": m.bits_per_weight(),
                               "bits_per_weight_with_codebook": m.bits_per_weight(include_codebook=True)}
    prefixes = tuple(f"{name}." for name in layers)
    for key, t in model.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = (t.float() if t.is_floating_point() else t).detach().contiguous().cpu()

    os.makedirs(out_dir, exist_ok=True)
    marker, model_path = os.path.join(out_dir, QUANT_FILE), os.path.join(out_dir, MODEL_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.remove(marker)  # the directory counts as incomplete until the new marker is written
    with atomic_path(model_path) as tmp:
        save_file(tensors, tmp, metadata={"format": "vq4dit-quantized"})
    write_text_atomic(os.path.join(out_dir, CONFIG_FILE), yaml.safe_dump(dict(config), sort_keys=False))
    quant = {"format_version": FORMAT_VERSION, "base_model": asdict(spec), "layers": layer_entries,
             "tensors": {k: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for k, t in tensors.items()},
             "model_bytes": os.path.getsize(model_path)}
    write_text_atomic(marker, json.dumps(quant, indent=1) + "\n")
    logger.info("saved %d quantized layers to %s (%.2f MB)", len(layers), out_dir, quant["model_bytes"] / 1e6)
    return quant


def read_quant_config(out_dir):
    """Parse and validate quant_config.json; every problem is a one-line UserError naming the file."""
    path = os.path.join(out_dir, QUANT_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; {out_dir} is not a complete quantized artifact (interrupted save?)")
    try:
        with open(path) as f:
            quant = json.load(f)
        version = quant["format_version"]
        if not isinstance(version, int):
            raise TypeError(f"format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise UserError(f"{path}: format_version {version} is newer than this code supports "
                            f"({FORMAT_VERSION}); update vq4dit")
        for name, meta in quant["layers"].items():
            if meta["class"] not in CODECS:
                raise UserError(f"{path}: layer {name} has unknown class {meta['class']!r}; "
                                f"known: {', '.join(CODECS)}")
            for suffix, (shape, dtype) in CODECS[meta["class"]].tensor_specs(meta).items():
                entry = quant["tensors"][f"{name}.{suffix}"]
                if entry != {"shape": list(shape), "dtype": dtype_name(dtype)}:
                    raise ValueError(f"tensor {name}.{suffix} is listed as {entry}, its layer implies "
                                     f"shape {list(shape)} {dtype_name(dtype)}")
        for key, entry in quant["tensors"].items():
            if entry["dtype"] not in DTYPES or not all(isinstance(s, int) and s >= 0 for s in entry["shape"]):
                raise ValueError(f"tensor {key} has a bad entry {entry}")
        DiTSpec(**quant["base_model"])
        int(quant["model_bytes"])
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: malformed ({type(e).__name__}: {e})".replace("\n", " ")) from e
    return quant


def read_tensors(out_dir, quant, device="cpu"):
    """Load model.safetensors and check every tensor's name, shape and dtype against quant_config.json."""
    path = os.path.join(out_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing")
    size = os.path.getsize(path)
    if size != quant["model_bytes"]:
        raise UserError(f"{path}: {size} bytes, quant_config.json records {quant['model_bytes']} (truncated?)")
    try:
        tensors = load_file(path, device=device)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable ({e})".replace("\n", " ")) from e
    missing, extra = quant["tensors"].keys() - tensors.keys(), tensors.keys() - quant["tensors"].keys()
    if missing or extra:
        raise UserError(f"{path}: tensors differ from quant_config.json (missing: {sorted(missing)[:3]}, "
                        f"unexpected: {sorted(extra)[:3]})")
    for key, entry in quant["tensors"].items():
        t = tensors[key]
        if list(t.shape) != entry["shape"] or dtype_name(t.dtype) != entry["dtype"]:
            raise UserError(f"{path}: tensor {key} is {list(t.shape)} {dtype_name(t.dtype)}, quant_config.json "
                            f"says {entry['shape']} {entry['dtype']}")
    check_finite(tensors, path)
    return tensors


@torch.no_grad()
def decode_layers(model):
    """Replace every quantized layer (any class with a codec) by an nn.Linear holding its decoded weight, in place.

    The quantized layers decode their weight in every forward, which keeps memory compressed but costs time
    at small batches; decoded once, the model samples at full-precision speed and memory, with identical
    outputs. Returns the number of layers replaced.
    """
    classes = tuple(codec.cls for codec in CODECS.values())
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, classes)]
    for name, layer in targets:
        weight = layer.weight()  # (out, in)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        set_submodule(model, name, linear.eval())
    return len(targets)


def load_quantized(out_dir, device="cpu", decode=False):
    """Load an artifact written by save_quantized -> (model in eval mode, DiTSpec, quant_config dict).

    decode: replace the quantized layers by plain Linears with the decoded weights (see decode_layers).
    """
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: not a directory; give an artifact directory written by quantize.py")
    quant = read_quant_config(out_dir)
    tensors = read_tensors(out_dir, quant, device)
    spec = DiTSpec(**quant["base_model"])
    model = spec.build().to(device)
    state = dict(tensors)
    for name, meta in quant["layers"].items():
        codec = CODECS[meta["class"]]
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise UserError(f"{os.path.join(out_dir, QUANT_FILE)}: layer {name} does not exist in "
                            f"{spec.name}") from e
        set_submodule(model, name, codec.build(meta).to(device))
        packed = {suffix: state.pop(f"{name}.{suffix}") for suffix in codec.tensor_specs(meta)}
        try:
            unpacked = codec.unpack(meta, packed)
        except ValueError as e:
            raise UserError(f"{os.path.join(out_dir, MODEL_FILE)}: layer {name}: {e} (corrupt file?)") from e
        state.update({f"{name}.{k}": v for k, v in unpacked.items()})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{os.path.join(out_dir, MODEL_FILE)}: does not fit {spec.name} "
                        f"({str(e).splitlines()[0]})") from e
    if decode:
        decode_layers(model)
    return model.eval(), spec, quant
