"""Resumable calibration state in <out_dir>/calib_state/, saved at every block boundary (block-wise) or
every few minutes of training (joint).

Files: layers-<tag>.safetensors (the calibrated, hard layers of blocks < next; in a joint checkpoint every
layer, soft or hard), acts-<tag>.safetensors (the cached tensors the walk needs to continue: the recorded
slots and each chain's block outputs, see tables_to_tensors), for a joint checkpoint train-<tag>.safetensors (the
RMSprop state), and state.json (next block, config hash, stats, the training snapshot, the recorded block-call
wiring, and the names of those files). The tensor files are written first under new names and
state.json is replaced last, so a kill at any moment leaves the previous consistent state. No RNG state is
needed: the minibatch order of a block (or of the joint run) comes from its own generator seeded by the seed.
"""
import hashlib
import json
import logging
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.fileio import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

STATE_DIR = "calib_state"
STATE_JSON = "state.json"
FORMAT = 2  # 2: model-agnostic recorded wiring and tables (1: DiT-only x_fp / x_q / c)


RUN_ONLY_FIELDS = ("device", "cache_dir", "max_cache_gb")  # where the run happens, not what it computes


def config_hash(config):
    """A digest of every config field but RUN_ONLY_FIELDS: a resumed run must be the run that was interrupted."""
    fields = {k: v for k, v in config.to_dict().items() if k not in RUN_ONLY_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def layers_state(qlayers, names):
    """{"<layer>.<tensor>": tensor} of the named layers (contiguous CPU copies for safetensors)."""
    return {f"{name}.{key}": t.detach().cpu().contiguous() for name in names
            for key, t in qlayers[name].state_dict().items()}


def restore_layers(qlayers, tensors):
    """Load a `layers_state` dict back; a target layer is hardened first when its saved state is hard."""
    grouped = {}
    for key, t in tensors.items():
        name, _, param = key.rpartition(".")
        grouped.setdefault(name, {})[param] = t
    for name, sub in grouped.items():
        layer = qlayers[name]
        if "indices" in sub:
            layer.harden()
        layer.load_state_dict(sub, strict=True)


def flatten_optimizer(state_dict):
    """optimizer.state_dict() -> (JSON-able meta, {"<param>.<key>": tensor}) for safetensors + state.json."""
    meta, tensors = {}, {}
    for index, entries in state_dict["state"].items():
        meta[str(index)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta[str(index)][key] = value
    return {"state": meta, "param_groups": state_dict["param_groups"]}, tensors


def unflatten_optimizer(meta, tensors):
    """The inverse of flatten_optimizer: a dict for optimizer.load_state_dict."""
    state = {int(index): dict(entries) for index, entries in meta["state"].items()}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state[int(index)][name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _read_json(out_dir):
    """The parsed state.json of out_dir's state (OSError when there is none, ValueError when malformed)."""
    with open(os.path.join(out_dir, STATE_DIR, STATE_JSON)) as f:
        return json.load(f)


def tables_to_tensors(tables):
    """{"fp": {key: t}, "q": {key: t}} -> one flat dict "<table>/<key>"; a tensor held by both tables (a slot) is
    stored once, under "shared/<key>"."""
    out = {}
    for name, table in tables.items():
        for key, t in table.items():
            shared = all(key in other and other[key] is t for other in tables.values())
            out[f"shared/{key}" if shared and len(tables) > 1 else f"{name}/{key}"] = t
    return out


def tensors_to_tables(tensors, names):
    """The inverse of tables_to_tensors for the table `names` (a shared tensor becomes one object in each)."""
    tables = {name: {} for name in names}
    for flat, t in tensors.items():
        where, _, key = flat.partition("/")
        for name in (names if where == "shared" else [where]):
            tables[name][key] = t
    return tables


def save_state(out_dir, digest, next_block, stats, layers, acts=None, train=None, wiring=None):
    """Write the state after block next_block - 1: layers {key: tensor}, acts {key: tensor} (None: keep the
    current state's activations), stats (list), train: None, or (snapshot meta, {key: tensor}) of an
    unfinished joint training; wiring: the recorded calibration set's wiring (None: keep the current one)."""
    directory = os.path.join(out_dir, STATE_DIR)
    tag = f"{next_block:05d}" if train is None else f"{next_block:05d}-{train[0]['iteration']:06d}"
    files = {"layers": f"layers-{tag}.safetensors"}
    tensors = {"layers": layers}
    if wiring is None and os.path.exists(os.path.join(directory, STATE_JSON)):
        wiring = _read_json(out_dir).get("wiring")
    if acts is None:
        files["acts"] = _read_json(out_dir)["acts"]
    else:
        files["acts"], tensors["acts"] = f"acts-{tag}.safetensors", acts
    if train is not None:
        files["train"], tensors["train"] = f"train-{tag}.safetensors", train[1]
    for kind, group in tensors.items():
        with atomic_path(os.path.join(directory, files[kind])) as tmp:
            save_file({k: v.contiguous() for k, v in group.items()}, tmp)
    meta = {"format": FORMAT, "config_hash": digest, "next_block": next_block, "stats": stats, **files,
            "train_state": None if train is None else train[0], "wiring": wiring}
    write_text_atomic(os.path.join(directory, STATE_JSON), json.dumps(meta, indent=1) + "\n")
    for entry in os.listdir(directory):
        # older states, and temporaries of a write that a SIGKILL interrupted
        if (entry.endswith(".safetensors") and entry not in files.values()) or entry.endswith(".tmp"):
            os.remove(os.path.join(directory, entry))


def resume_point(out_dir):
    """Where a rerun picks up, in words: "block B", "joint iteration I" or "online trajectory T"; None when no state
    is saved."""
    try:
        meta = _read_json(out_dir)
        train = meta.get("train_state")
        if not train:
            return f"block {int(meta['next_block'])}"
        if "trajectory" in train:
            return f"online trajectory {int(train['trajectory'])}"
        return f"joint iteration {int(train['iteration'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_state(out_dir):
    """Delete the calibration state once the artifact is complete (for DiT-XL/2 it holds GiBs of activations)."""
    shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)


def read_state_meta(out_dir, digest):
    """state.json of a saved state (dict), or None when there is none; a state of another config or format is a
    UserError. Cheap: the pipeline calls it before k-means, so a mismatched --out fails in seconds."""
    directory = os.path.join(out_dir, STATE_DIR)
    if not os.path.exists(os.path.join(directory, STATE_JSON)):
        return None
    try:
        meta = _read_json(out_dir)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        if meta["config_hash"] != digest:
            raise UserError(f"{directory} holds the state of a calibration with a different config "
                            f"({meta['config_hash']} vs {digest} now): use a fresh --out or delete {directory}")
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot resume from {directory} ({e}): delete it to start over") from None
    return meta


def load_state(out_dir, digest):
    """(meta, layers, acts, train tensors or None) of a saved state, or None when there is none; a different
    config is a UserError."""
    meta = read_state_meta(out_dir, digest)
    if meta is None:
        return None
    directory = os.path.join(out_dir, STATE_DIR)
    try:
        layers = load_file(os.path.join(directory, meta["layers"]))
        acts = load_file(os.path.join(directory, meta["acts"]))
        train = load_file(os.path.join(directory, meta["train"])) if meta.get("train_state") else None
    except (OSError, KeyError, SafetensorError) as e:
        raise UserError(f"cannot resume from {directory} ({e}): delete it to start over") from None
    return meta, layers, acts, train
