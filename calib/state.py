"""Resumable calibration state in <out_dir>/calib_state/, saved at every block boundary.

Files: layers-<next>.safetensors (the calibrated, hard layers of blocks < next), acts-<next>.safetensors
(the activations the walk needs to continue) and state.json (next block, config hash, stats, and the
names of those two files). The tensor files are written first under new names and state.json is
replaced last, so a kill at any moment leaves the previous consistent state. No RNG state is needed:
each block's minibatch order comes from its own generator seeded by (seed, block).
"""
import hashlib
import json
import logging
import os
import shutil

from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.fileio import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

STATE_DIR = "calib_state"
STATE_JSON = "state.json"
FORMAT = 1


def config_hash(config):
    """A digest of every config field: a resumed run must be the run that was interrupted."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def layers_state(qlayers, names):
    """{"<layer>.<tensor>": tensor} of the named layers (contiguous CPU copies for safetensors)."""
    return {f"{name}.{key}": t.detach().cpu().contiguous() for name in names
            for key, t in qlayers[name].state_dict().items()}


def restore_layers(qlayers, tensors):
    """Load a `layers_state` dict back; the saved layers are hard, so each target layer is hardened first."""
    grouped = {}
    for key, t in tensors.items():
        name, _, param = key.rpartition(".")
        grouped.setdefault(name, {})[param] = t
    for name, sub in grouped.items():
        layer = qlayers[name]
        layer.harden()
        layer.load_state_dict(sub, strict=True)


def save_state(out_dir, digest, next_block, stats, layers, acts):
    """Write the state after block next_block - 1: layers {key: tensor}, acts {key: tensor}, stats (list)."""
    directory = os.path.join(out_dir, STATE_DIR)
    files = {"layers": f"layers-{next_block:05d}.safetensors", "acts": f"acts-{next_block:05d}.safetensors"}
    for kind, tensors in (("layers", layers), ("acts", acts)):
        with atomic_path(os.path.join(directory, files[kind])) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    meta = {"format": FORMAT, "config_hash": digest, "next_block": next_block, "stats": stats, **files}
    write_text_atomic(os.path.join(directory, STATE_JSON), json.dumps(meta, indent=1) + "\n")
    for entry in os.listdir(directory):
        # older states, and temporaries of a write that a SIGKILL interrupted
        if (entry.endswith(".safetensors") and entry not in files.values()) or entry.endswith(".tmp"):
            os.remove(os.path.join(directory, entry))


def remove_state(out_dir):
    """Delete the calibration state once the artifact is complete (for DiT-XL/2 it holds GiBs of activations)."""
    shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)


def load_state(out_dir, digest):
    """(meta, layers, acts) of a saved state, or None when there is none; a different config is a UserError."""
    directory = os.path.join(out_dir, STATE_DIR)
    path = os.path.join(directory, STATE_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        if meta["config_hash"] != digest:
            raise UserError(f"{directory} holds the state of a calibration with a different config "
                            f"({meta['config_hash']} vs {digest} now): use a fresh --out or delete {directory}")
        layers = load_file(os.path.join(directory, meta["layers"]))
        acts = load_file(os.path.join(directory, meta["acts"]))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot resume from {directory} ({e}): delete it to start over") from None
    return meta, layers, acts
