"""Reading checkpoint files safely: every problem with a file is a one-line UserError naming it.

- .safetensors: memory-mapped; files written by models.loading.save_dit carry a content digest in their header
  (`content_sha256`, see state_digest), verified when present.
- .pt / .pth: torch.load(weights_only=True), memory-mapped for the zip format of torch >= 1.6. torch.load does
  not check the CRC-32 of the zip records (a flipped byte in a tensor loads silently), so they are checked here
  first with zipfile; the bare-pickle format of older torch has no checksum, and such a file loads whatever it holds.
"""
import argparse
import contextlib
import hashlib
import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from vq4dit.utils.errors import UserError, check_finite

logger = logging.getLogger(__name__)

DIGEST_KEY = "content_sha256"  # safetensors metadata entry of save_dit: see state_digest


def state_digest(state, meta):
    """sha256 over the metadata (but the digest itself), every tensor's name, dtype and shape, and its bytes: what
    save_dit records in the header and loading verifies, so that no changed byte of such a file loads silently."""
    header = {"metadata": {k: v for k, v in meta.items() if k != DIGEST_KEY},
              "tensors": {k: [str(t.dtype), list(t.shape)] for k, t in state.items()}}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for key in sorted(state):
        h.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _first_line(error):
    """The first line of an exception's message, or its type when it has none (torch's EOFError has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_safetensors(path):
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != state_digest(state, meta):
        raise UserError(f"{path}: content does not match the {DIGEST_KEY} in its header; the file is corrupt or "
                        "was changed after saving")
    return state, meta


def _check_zip_records(path):
    """Check the CRC-32 of every record of a zip-format .pt (torch.load does not). Files saved with
    torch.serialization.set_crc32_options(False) record no CRCs (all zero) and cannot be checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(r.CRC for r in records):
                logger.warning("%s records no CRC-32 checksums; a corrupt byte in it would go unnoticed", path)
                return
            for record in records:
                with archive.open(record) as f:
                    while f.read(1 << 24):
                        pass
    except Exception as e:
        raise UserError(f"{path}: corrupt or truncated checkpoint archive ({_first_line(e)}); expected a .pt written "
                        "by torch.save") from None


def refuse_artifact_file(path):
    """A UserError pointing at sample.py --quantized when the safetensors file `path` is a quantized artifact's packed
    tensors (its header's format), read from the header only; nothing for any other file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not safetensors: the caller's reading says what it is
        return
    if meta.get("format") == "vq4dit-quantized":  # an artifact's packed tensors, not a model's weights
        raise UserError(f"{path}: the packed tensors of a quantized vq4dit artifact, not full-precision weights; "
                        f"sample it with sample.py --quantized {Path(path).parent}")


def read_state_file(path):
    """A dict of tensors from a .safetensors or torch pickle file (weights_only), plus safetensors metadata."""
    if Path(path).stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes); expected a DiT .pt/.pth or .safetensors checkpoint")
    if str(path).endswith(".safetensors"):
        refuse_artifact_file(path)
        state, meta = _read_safetensors(path)
        check_finite(state, path)
        return state, meta
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format since torch 1.6; older files are bare pickles
    if is_zip:
        _check_zip_records(path)
    try:
        with _allow_namespace():  # DiT's train.py saves its argparse arguments beside the weights
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: unknown checkpoint format, refused by the safe loader (torch.load weights_only=True: "
                        f"{_unpickle_detail(e)}); "
                        "expected a DiT .pt/.pth state dict of tensors, a training checkpoint with 'ema' or a "
                        ".safetensors file; pickles that need code to load are never loaded") from None
    except Exception as e:
        raise UserError(f"{path}: unknown checkpoint format (torch.load with weights_only failed: "
                        f"{_first_line(e)}); expected a DiT .pt/.pth state dict, a training "
                        "checkpoint with 'ema', a .safetensors file or a diffusers directory") from None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        logger.warning("%s has no 'ema' weights; using 'model'", path)
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path}: unknown checkpoint format; expected a state dict of tensors "
                        "or a training checkpoint with an 'ema' state dict")
    check_finite(obj, path)
    return obj, {}


@contextlib.contextmanager
def _allow_namespace():
    """Let the weights_only unpickler build argparse.Namespace (a plain attribute bag, runs no code)."""
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            yield
    else:  # torch 2.4 has only the global allowlist
        torch.serialization.add_safe_globals([argparse.Namespace])
        yield


def _unpickle_detail(error):
    """The line of torch's weights_only refusal that says what was refused (its first line advises
    weights_only=False, which would run the file's code)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))]
    return (useful or lines or [type(error).__name__])[0]
