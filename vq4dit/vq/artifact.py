"""Quantized-model artifacts: a directory with model.safetensors, quant_config.json and config.yaml.

- model.safetensors: per quantized layer the compact tensors of its codec (vq/codecs.py), named
  "<layer>.<suffix>"; every other state-dict tensor of the model in fp32.
- quant_config.json (format 2): format_version; base_model, a model reference (vq/modelref.py: class + config,
  weights aside); per-layer class and hyperparameters and bits per weight; the shape and dtype of every tensor in
  model.safetensors, the file's size and its sha256 (`model_sha256`), config.yaml's sha256 (`config_sha256`); and
  `content_sha256`, the sha256 of the canonical JSON of everything else in quant_config.json. The digests are
  checked on load, so a changed byte in either file either leaves the parsed content identical (JSON whitespace)
  or is refused. The file is written last, so its presence marks a complete artifact (it is removed first when an
  artifact is overwritten).
  Format 1 (base_model = the project DiT's registry fields, no digests) still loads.
- config.yaml: the resolved quantization config, for the record; quant_config.json holds its sha256
  (`config_sha256`), so a config.yaml that is missing or not the artifact's own is refused on load.
- README.md: the model card (vq/modelcard.py), hub metadata and how to load the artifact; derived from the above.

Loading builds the model with its parameters on the meta device and assigns every tensor in its final dtype
(indices uint8 / int16 / int32, as the layers keep them), so no full-precision block weight is ever allocated.
"""
import hashlib
import json
import logging
import os
from collections.abc import Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vq4dit.utils.digest import file_sha256
from vq4dit.utils.errors import UserError, check_finite, error_detail
from vq4dit.utils.fileio import atomic_paths, write_text_atomic
from vq4dit.utils.hubid import hub_id_like, local_reading
from vq4dit.utils.outdir import held_by, writer_of
from vq4dit.vq.apply import set_submodule
from vq4dit.vq.codecs import CODECS, codec_for
from vq4dit.vq.modelcard import CARD_FILE, model_card
from vq4dit.vq.modelref import build_skeleton, model_class

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MODEL_FILE, QUANT_FILE, CONFIG_FILE = "model.safetensors", "quant_config.json", "config.yaml"
ARTIFACT_FILES = (MODEL_FILE, QUANT_FILE, CONFIG_FILE, CARD_FILE)
ARTIFACT_TOOL = "a quantized artifact"  # what an artifact directory's marker (utils/outdir.py) says it holds
DIGEST = "content_sha256"  # quant_config.json's digest of its own content
LEGACY_DIT = "vq4dit.models.dit.DiT"  # the class every format-1 artifact describes
DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8, "int64": torch.int64}


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def quantized_layers(model):
    """{qualified name: (module, codec)} for every module of a registered quantized class."""
    return {name: (m, codec_for(m)) for name, m in model.named_modules() if codec_for(m) is not None}


def content_digest(quant):
    """sha256 of the canonical JSON (sorted keys, no spaces) of quant_config's content without its digest."""
    content = {k: v for k, v in quant.items() if k != DIGEST}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def quant_config_text(quant):
    """(quant_config content with its content digest, as a reader parses it; the file's text)."""
    quant = json.loads(json.dumps({k: v for k, v in quant.items() if k != DIGEST}, allow_nan=False))
    quant[DIGEST] = content_digest(quant)
    return quant, json.dumps(quant, indent=1) + "\n"


def write_quant_config(out_dir, quant):
    """Write quant_config.json with its content digest (atomically); returns the content as a reader parses it."""
    quant, text = quant_config_text(quant)
    write_text_atomic(os.path.join(out_dir, QUANT_FILE), text)
    return quant


def save_quantized(model, ref, out_dir, config, run_key=None):
    """Write `model` (every quantized layer hard) as an artifact directory; returns the quant_config dict.

    ref: the base model's reference (vq.modelref.reference(model, **extra)), stored as `base_model`. run_key: a
    string naming what made it (jobs.runkey.RunKey.digest), stored as `run_key` when given.
    Codebooks are first rounded in place to what the file stores (fp16), and every layer's packed tensors are
    decoded again and compared with the layer, so the in-memory model equals the one load_quantized returns.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if not isinstance(ref, Mapping) or not isinstance(ref.get("config"), Mapping):
        raise TypeError(f"ref must be a model reference (vq.modelref.reference(model)), got {type(ref).__name__}")
    if not isinstance(model, model_class(ref)):
        raise TypeError(f"the model is a {type(model).__name__}, its reference names {ref['class']}")
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

    config_text = yaml.safe_dump(dict(config), sort_keys=False)
    files = {name: os.path.join(out_dir, name) for name in (MODEL_FILE, CONFIG_FILE, CARD_FILE, QUANT_FILE)}
    # all four appear together or (a full disk, an interrupt) none: quant_config.json, renamed last, marks the
    # artifact complete, and its digests refuse a model.safetensors of another save
    with atomic_paths(files.values()) as (model_tmp, config_tmp, card_tmp, quant_tmp):
        save_file(tensors, model_tmp, metadata={"format": "vq4dit-quantized"})
        write_text(config_tmp, config_text)
        write_text(card_tmp, model_card(ref, layer_entries, config))
        quant, quant_text = quant_config_text({
            "format_version": FORMAT_VERSION, "base_model": dict(ref), "layers": layer_entries,
            "tensors": {k: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for k, t in tensors.items()},
            "model_bytes": os.path.getsize(model_tmp), "model_sha256": file_sha256(model_tmp),
            "config_sha256": file_sha256(config_tmp), **({} if run_key is None else {"run_key": run_key})})
        write_text(quant_tmp, quant_text)
    logger.info("saved %d quantized layers to %s (%.2f MB)", len(layers), out_dir, quant["model_bytes"] / 1e6)
    return quant


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def base_model_reference(quant):
    """The model reference of a parsed quant_config: format 2 stores one, format 1 the project DiT's fields."""
    base = quant["base_model"]
    if not isinstance(base, dict):
        raise TypeError(f"base_model must be an object, got {base!r}")
    if quant["format_version"] == 1:
        return {"class": LEGACY_DIT, "config": base}
    if not isinstance(base.get("class"), str) or not isinstance(base.get("config"), dict):
        raise TypeError(f"base_model must hold a class name and a config object, got keys {sorted(base)}")
    return base


def read_quant_config(out_dir):
    """Parse and validate quant_config.json, its content digest first; every problem is a one-line UserError."""
    path = os.path.join(out_dir, QUANT_FILE)
    if not os.path.isfile(path):
        writer = writer_of(out_dir)
        if writer is not None:
            raise UserError(f"{out_dir}: another run (pid {writer}) is writing it; wait for it to end")
        if os.path.isfile(os.path.join(out_dir, "model_index.json")):
            raise UserError(f"{out_dir}: a diffusers pipeline directory, not a quantized artifact; quantize it "
                            f"(quantize.py --ckpt {out_dir}, or vq4dit.quantize_transformer) or load it with "
                            "diffusers")
        held = held_by(out_dir)
        if held not in (None, ARTIFACT_TOOL):
            raise UserError(f"{out_dir}: holds {held}, not a quantized artifact")
        raise UserError(f"{path}: missing; {out_dir} is not a complete quantized artifact (interrupted save?)")
    try:
        with open(path, "rb") as f:
            quant = json.loads(f.read())
        if not isinstance(quant, dict):
            raise TypeError(f"expected a JSON object, got {type(quant).__name__}")
        version = quant["format_version"]
        if type(version) is not int or version < 1:
            raise TypeError(f"format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise UserError(f"{path}: format_version {version} is newer than this code supports "
                            f"({FORMAT_VERSION}); update vq4dit")
        if (version >= 2 or DIGEST in quant) and quant[DIGEST] != content_digest(quant):
            raise UserError(f"{path}: content does not match its {DIGEST}; the file is corrupt or was edited "
                            "after saving")
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
            if entry["dtype"] not in DTYPES or not all(type(s) is int and s >= 0 for s in entry["shape"]):
                raise ValueError(f"tensor {key} has a bad entry {entry}")
        base_model_reference(quant)
        if type(quant["model_bytes"]) is not int:
            raise TypeError(f"model_bytes must be an integer, got {quant['model_bytes']!r}")
        if version >= 2 and not (isinstance(quant["model_sha256"], str) and len(quant["model_sha256"]) == 64):
            raise ValueError(f"model_sha256 must be 64 hex digits, got {quant['model_sha256']!r}")
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: malformed ({type(e).__name__}: {e})".replace("\n", " ")) from e
    return quant


def check_config_file(out_dir, quant):
    """config.yaml must be the artifact's own: quant_config.json records its sha256 (`config_sha256`, covered by the
    content digest; artifacts written before it was recorded are not checked). Missing or another: a UserError."""
    if "config_sha256" not in quant:
        return
    path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; quant_config.json records the sha256 of the config this artifact was made "
                        "with: restore the file or quantize again")
    if file_sha256(path) != quant["config_sha256"]:
        raise UserError(f"{path}: not this artifact's config (its sha256 differs from the config_sha256 in "
                        "quant_config.json); restore the original or quantize again")


def check_model_file(out_dir, quant):
    """model.safetensors must be the one quant_config.json describes: present, of its recorded size and sha256. Its
    path, or a UserError naming what differs."""
    path = os.path.join(out_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing")
    size = os.path.getsize(path)
    if size != quant["model_bytes"]:
        raise UserError(f"{path}: {size} bytes, quant_config.json records {quant['model_bytes']} (truncated?)")
    if "model_sha256" in quant and file_sha256(path) != quant["model_sha256"]:
        raise UserError(f"{path}: sha256 differs from the model_sha256 in quant_config.json; the file is corrupt "
                        "or was changed after saving")
    return path


def read_tensors(out_dir, quant, device="cpu"):
    """Load model.safetensors (memory-mapped where the device allows) after checking its size and sha256, then
    check every tensor's name, shape and dtype against quant_config.json and that no float is NaN/Inf."""
    path = check_model_file(out_dir, quant)
    try:
        tensors = load_file(path, device=device)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: unreadable ({e})".replace("\n", " ")) from None
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
        weight = layer.weight()  # (out, in), the only weight-sized allocation: it becomes the Linear's parameter
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        state = {"weight": weight} if layer.bias is None else {"weight": weight, "bias": layer.bias.detach()}
        linear.load_state_dict(state, assign=True)
        set_submodule(model, name, linear.eval())
    return len(targets)


def resolve_artifact(source, revision=None):
    """The local directory of an artifact given as a directory or as a hub repo id ("owner/name").

    A hub repo is fetched through huggingface_hub into its cache (only the artifact's files); with HF_HUB_OFFLINE=1
    the cached snapshot of `revision` (default: the branch main) is used without any network access. The files are
    checked by load_quantized like any local artifact (content and model digests).
    """
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).strip():
        raise UserError(f"{source!r}: give an artifact directory or a hub repo id (owner/name)")
    path = os.path.expanduser(os.fspath(source))
    if os.path.exists(path) or not hub_id_like(source):
        if revision is not None:
            raise UserError(f"revision={revision!r}: only used with a hub repo id; {source} is a local path")
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(str(source), revision=revision, allow_patterns=list(ARTIFACT_FILES))
    except Exception as e:  # network, missing repo or revision, not in the offline cache: one line either way
        detail = error_detail(e)
        raise UserError(f"{source}: not a local directory{local_reading(source)}, and fetching it as a hub repo failed "
                        f"({detail})") from None


def load_quantized(out_dir, device="cpu", decode=False):
    """Load an artifact written by save_quantized -> (model in eval mode on `device`, model reference, quant_config).

    The base model is rebuilt from its reference with its parameters on the meta device, each quantized layer's
    skeleton too, and every tensor is assigned in its final dtype: nothing of full-precision size is allocated.
    decode: replace the quantized layers by plain Linears with the decoded weights (see decode_layers).
    """
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        parent = os.path.dirname(out_dir) or "."
        inside = os.path.basename(out_dir) in ARTIFACT_FILES and os.path.isfile(os.path.join(parent, QUANT_FILE))
        hint = (f"give the artifact's directory, {parent}" if inside
                else "give an artifact directory written by quantize.py")
        raise UserError(f"{out_dir}: not a directory; {hint}")
    quant_path, model_path = os.path.join(out_dir, QUANT_FILE), os.path.join(out_dir, MODEL_FILE)
    quant = read_quant_config(out_dir)
    check_config_file(out_dir, quant)
    ref = base_model_reference(quant)
    tensors = read_tensors(out_dir, quant, device)
    model = build_skeleton(ref, source=quant_path)
    state = {}
    for name, meta in quant["layers"].items():
        codec = CODECS[meta["class"]]
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{quant_path}: layer {name} does not exist in {ref['class']}") from None
        try:
            with torch.device("meta"):
                set_submodule(model, name, codec.build(meta))
        except (KeyError, TypeError, ValueError) as e:  # possible in a format-1 file, which has no digest
            raise UserError(f"{quant_path}: layer {name} is malformed ({type(e).__name__}: {e})") from None
        packed = {suffix: tensors.pop(f"{name}.{suffix}") for suffix in codec.tensor_specs(meta)}
        try:
            unpacked = codec.unpack(meta, packed)
        except ValueError as e:
            raise UserError(f"{model_path}: layer {name}: {e} (corrupt file?)") from None
        state.update({f"{name}.{k}": v for k, v in unpacked.items()})
    state.update(tensors)  # everything else: full precision, fp32 as stored
    expected = model.state_dict()  # the skeleton's: shapes and dtypes, no memory
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{model_path}: does not fit {ref['class']} (missing: {missing[:3]}, "
                        f"unexpected: {unexpected[:3]})")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise UserError(f"{model_path}: does not fit {ref['class']}: {key} is {list(got.shape)}, the model's "
                            f"is {list(want.shape)}")
        if got.dtype != want.dtype and got.is_floating_point() and want.is_floating_point():
            state[key] = got.to(want.dtype)
        elif got.dtype != want.dtype:
            raise RuntimeError(f"{key}: decoded as {got.dtype}, the layer keeps {want.dtype}")
    model.load_state_dict(state, strict=True, assign=True)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"{len(on_meta)} tensors of {ref['class']} got no value on load (first: {on_meta[0]})")
    model.to(device)  # buffers the skeleton computed itself; loaded tensors are on `device` already
    if decode:
        decode_layers(model)
    return model.eval(), ref, quant
