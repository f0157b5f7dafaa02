"""Resumable calibration state in <out_dir>/calib_state/, saved at every block boundary (block-wise) or
every few minutes of training (joint, online).

`CalibState` owns the output directory's calibration files, the run key, the log and resume. Files:
layers-<tag>.safetensors (the calibrated, hard layers of blocks < next; in a joint or online checkpoint every
layer, soft or hard), acts-<tag>.safetensors (the cached tensors the walk needs to continue: the recorded
slots and each chain's block outputs, calib.tables.Chains.to_tensors), for a joint or online checkpoint
train-<tag>.safetensors (the RMSprop state), and state.json (next block, the run's RunKey, stats, the training
snapshot, the recorded block-call wiring, and the names of those files). The tensor files are written first under
new names and state.json is replaced last, so a kill at any moment leaves the previous consistent state. No RNG state is
needed: the minibatch order of a block (or of the joint run) comes from its own generator seeded by the seed.
"""
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from utils.digest import sampled_digest
from utils.errors import UserError
from utils.fileio import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

STATE_DIR = "calib_state"
STATE_JSON = "state.json"
LOG_NAME = "calib_log.jsonl"  # per-block stats of the calibration, one JSON line per block
CACHE_DIR = "calib_cache"  # where activations past the memory budget go, unless the config names a cache_dir
FORMAT = 3  # 3: the run key by content (2: a hash of the config, checkpoint path included; 1: DiT-only tables)


RUN_ONLY_FIELDS = ("device", "cache_dir", "max_cache_gb")  # where the run happens, not what it computes


@dataclass(frozen=True)
class Input:
    """A file the result depends on, by content: its role (for messages), its path as configured, and its
    utils.digest.sampled_digest (a path that does not exist locally, e.g. a hub id, is identified by its name)."""

    role: str
    path: str
    digest: str

    @classmethod
    def of(cls, role, path):
        local = os.path.expanduser(path)
        if not os.path.exists(local):
            return cls(role, path, "not a local path")
        try:
            return cls(role, path, sampled_digest(local))
        except OSError as e:
            raise UserError(f"{role} {path}: cannot read it ({e.strerror})") from None


@dataclass(frozen=True)
class RunKey:
    """What a calibration's result depends on: every config field but RUN_ONLY_FIELDS ({field: value}, as JSON
    gives it back) and the content of its input files (Input: the checkpoint, the prompts file). A resumed run must
    have the key of the run that was interrupted: the same path holding another checkpoint would otherwise give an
    artifact whose first blocks come from one model and the rest from another."""

    config: dict
    inputs: tuple = ()

    @classmethod
    def of(cls, config):
        """The key of QuantizeConfig `config`; each input file is digested here, once per run."""
        from models.loading import embedded_ckpt_path

        fields = {k: v for k, v in config.to_dict().items() if k not in RUN_ONLY_FIELDS}
        spec = config.model
        inputs = [Input.of("checkpoint", spec.ckpt if spec.ckpt is not None else str(embedded_ckpt_path()))]
        if spec.prompts:
            inputs.append(Input.of("prompts file", spec.prompts))
        return cls(json.loads(json.dumps(fields)), tuple(inputs))

    def to_json(self):
        return {"config": self.config, "inputs": [asdict(i) for i in self.inputs]}

    def change(self, saved):
        """What differs from `saved` (a to_json() read back) in words, or None: an input file whose content changed
        first, then the config fields that differ (a new path is one of them)."""
        before = {i["role"]: i for i in saved["inputs"]}
        for now in self.inputs:
            old = before.get(now.role)
            if old is not None and old["digest"] != now.digest:
                return (f"{now.role} {now.path} changed since the saved calibration state (digest {old['digest']} "
                        f"!= {now.digest})")
        old_config = saved["config"]
        changed = sorted(k for k in old_config.keys() | self.config.keys() if old_config.get(k) != self.config.get(k))
        if changed:
            return "the config changed since the saved calibration state (" + ", ".join(
                f"{k} {old_config.get(k)!r} -> {self.config.get(k)!r}" for k in changed[:3]) + ")"
        return None


def discard_state(out_dir, overwrite, why):
    """A calibration state in `out_dir` that this run will not resume (`why`, in words) is another run's: refused
    naming it, or deleted with a warning when `overwrite` (--overwrite) is given. No state.json (no state, or only
    the temporaries of a run killed before its first save): nothing to resume, nothing to do."""
    directory = os.path.join(out_dir, STATE_DIR)
    if not os.path.lexists(os.path.join(directory, STATE_JSON)):
        return
    if not overwrite:
        raise UserError(f"{directory}: {why}; rerun with a new --out, delete {directory}, or pass --overwrite to "
                        "start over")
    logger.warning("--overwrite: deleting %s (%s)", directory, why)
    if os.path.isdir(directory) and not os.path.islink(directory):
        shutil.rmtree(directory)
    else:
        os.remove(directory)


def layers_state(layers):
    """{"<layer>.<tensor>": tensor} of the layers {name: module} (contiguous CPU copies for safetensors)."""
    return {f"{name}.{key}": t.detach().cpu().contiguous() for name, layer in layers.items()
            for key, t in layer.state_dict().items()}


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


@dataclass
class Saved:
    """The tensors of a saved state: layers {key: tensor}, acts {name: tensor}, train (optimizer tensors) or None."""

    layers: dict
    acts: dict
    train: dict | None


class CalibState:
    """The resumable calibration of one output directory: <out_dir>/calib_state/ and the log <out_dir>/calib_log.jsonl.

    Opening it checks at once (before any k-means) that a state left there is this run's (its RunKey: config and
    input files by content): a state of another run or format is a UserError naming what changed, or is deleted
    when `overwrite`. `meta` is the saved state.json (None: a fresh start). The writers save after
    every block (block-wise) or every few minutes of training (joint, online); the tensor files are written first
    under new names and state.json is replaced last, so a kill at any moment leaves the previous consistent state.
    """

    def __init__(self, out_dir, key, overwrite=False):
        self.out_dir, self.key = out_dir, key
        self.directory = os.path.join(out_dir, STATE_DIR)
        self.log_path = os.path.join(out_dir, LOG_NAME)
        self.cache_dir = os.path.join(out_dir, CACHE_DIR)
        self.meta = self._read_meta(overwrite)
        self._saved = None

    @classmethod
    def for_config(cls, out_dir, config, overwrite=False):
        return cls(out_dir, RunKey.of(config), overwrite)

    def _read_meta(self, overwrite):
        path = os.path.join(self.directory, STATE_JSON)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                meta = json.load(f)
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
            change = self.key.change(meta["run"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            change = f"it cannot be resumed ({type(e).__name__}: {e})".replace("\n", " ")
        if change is None:
            return meta
        discard_state(self.out_dir, overwrite, change)
        return None

    # --- what a resumed run picks up ------------------------------------------------------------------------
    @property
    def next_block(self):
        return 0 if self.meta is None else self.meta["next_block"]

    @property
    def complete(self):
        """Whether the saved state is a finished calibration (every stage done: the artifact is its layers)."""
        return self.meta is not None and bool(self.meta.get("complete"))

    @property
    def stats(self):
        return [] if self.meta is None else list(self.meta["stats"])

    @property
    def train_snapshot(self):
        """The saved training snapshot (JSON part) of a joint or online run stopped mid-training, else None."""
        return None if self.meta is None else self.meta.get("train_state")

    @property
    def saved(self):
        """The saved tensors (Saved), read once; a missing or corrupt file is a UserError."""
        if self._saved is None:
            self._saved = self._load()
        return self._saved

    def restore(self, layers):
        """Load the saved layers into `layers` {name: layer} (a layer saved hard is hardened first); fresh: no-op."""
        if self.meta is not None:
            restore_layers(layers, self.saved.layers)

    def resume_snapshot(self):
        """The Trainer snapshot of a joint or online run stopped mid-training, optimizer tensors included, or None."""
        train = self.train_snapshot
        if not train:
            return None
        return {**train, "optimizer": unflatten_optimizer(train["optimizer"], self.saved.train)}

    def _load(self):
        try:
            layers = load_file(os.path.join(self.directory, self.meta["layers"]))
            acts = load_file(os.path.join(self.directory, self.meta["acts"]))
            train = (load_file(os.path.join(self.directory, self.meta["train"])) if self.meta.get("train_state")
                     else None)
        except (OSError, KeyError, SafetensorError) as e:
            raise UserError(f"cannot resume from {self.directory} ({e}): delete it to start over") from None
        return Saved(layers, acts, train)

    def resume_point(self):
        """Where a rerun picks up, in words ("block B", "joint iteration I", "online trajectory T"), or None."""
        return describe_point(self.meta)

    # --- writers --------------------------------------------------------------------------------------------
    def start(self, wiring, acts):
        """A fresh calibration: an empty log, and the recorded set (wiring JSON, {name: tensor}) as block 0's state."""
        write_text_atomic(self.log_path, "")
        if wiring is not None:
            self._save(0, [], {}, acts, wiring=wiring)

    def block_done(self, stats, layers, acts, complete=False, then=None):
        """Block len(stats) - 1 is calibrated: its stats (the list so far), the hard layers {name: module} of every
        calibrated block, and the tables the next block needs (acts {name: tensor}); `complete`: nothing follows;
        `then`: what follows the last block, in words (where a rerun resumes)."""
        self._save(len(stats), stats, layers_state(layers), acts, complete=complete, then=then)
        self.log("blockwise", stats[-1:])

    def pass_done(self, mode, record, stats, layers):
        """A last stage after the walk (the end-to-end pass) is done: its `record`, logged under `mode`, and the
        final layers; the calibration is complete."""
        self._save(len(stats), stats, layers_state(layers), {}, complete=True)
        self.log(mode, [record])

    def checkpoint(self, snapshot, layers):
        """Mid-training (joint, online): a Trainer snapshot (its "optimizer" a live state_dict) and every layer."""
        optimizer_meta, optimizer_tensors = flatten_optimizer(snapshot["optimizer"])
        self._save(0, [], layers_state(layers), None, train=({**snapshot, "optimizer": optimizer_meta},
                                                              optimizer_tensors))

    def finish(self, mode, stats, layers):
        """Every block is calibrated (joint, online): the final layers and stats, logged under `mode`."""
        self._save(len(stats), stats, layers_state(layers), {}, complete=True)
        self.log(mode, stats)

    def log(self, mode, records):
        """Append JSON lines; rewritten atomically (the log is small) so a kill never leaves half a line."""
        old = open(self.log_path).read() if os.path.exists(self.log_path) else ""
        write_text_atomic(self.log_path, old + "".join(json.dumps({"mode": mode, **r}) + "\n" for r in records))

    def remove(self):
        """Delete the state once the artifact is complete (for DiT-XL/2 it holds GiBs of activations)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _save(self, next_block, stats, layers, acts, train=None, wiring=None, complete=False, then=None):
        """Write the state after block next_block - 1: layers {key: tensor}, acts {name: tensor} (None: keep the
        current state's, if any), train: None or (snapshot meta, {key: tensor}); wiring None: keep the current one;
        complete: the calibration is finished; then: the stage that follows, in words (None: block next_block)."""
        tag = f"{next_block:05d}" if train is None else f"{next_block:05d}-{train[0]['iteration']:06d}"
        files = {"layers": f"layers-{tag}.safetensors"}
        tensors = {"layers": layers}
        current = self.meta or {}
        if acts is None and "acts" in current:
            files["acts"] = current["acts"]
        else:
            acts = {} if acts is None else acts
            files["acts"], tensors["acts"] = f"acts-{tag}.safetensors", acts
        if train is not None:
            files["train"], tensors["train"] = f"train-{tag}.safetensors", train[1]
        for kind, group in tensors.items():
            with atomic_path(os.path.join(self.directory, files[kind])) as tmp:
                save_file({k: v.contiguous() for k, v in group.items()}, tmp)
        self.meta = {"format": FORMAT, "run": self.key.to_json(), "next_block": next_block, "stats": stats, **files,
                     "train_state": None if train is None else train[0], "complete": complete, "then": then,
                     "wiring": current.get("wiring") if wiring is None else wiring}
        write_text_atomic(os.path.join(self.directory, STATE_JSON), json.dumps(self.meta, indent=1) + "\n")
        for entry in os.listdir(self.directory):
            # older states, and temporaries of a write that a SIGKILL interrupted
            if (entry.endswith(".safetensors") and entry not in files.values()) or entry.endswith(".tmp"):
                os.remove(os.path.join(self.directory, entry))


def resume_point(out_dir):
    """Where a rerun picks up, in words: "block B", "joint iteration I" or "online trajectory T"; None when no state
    is saved (or it cannot be read)."""
    try:
        with open(os.path.join(out_dir, STATE_DIR, STATE_JSON)) as f:
            return describe_point(json.load(f))
    except (OSError, ValueError):
        return None


def describe_point(meta):
    """The resume point of a state.json's content in words; None for no state (or one that cannot say)."""
    try:
        train = meta.get("train_state")
        if not train and meta.get("then"):
            return meta["then"]
        if not train:
            return f"block {int(meta['next_block'])}"
        if "trajectory" in train:
            return f"online trajectory {int(train['trajectory'])}"
        return f"joint iteration {int(train['iteration'])}"
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
