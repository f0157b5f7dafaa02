"""The checkpoint store of a calibration: <out_dir>/calib_state/, and the log <out_dir>/calib_log.jsonl.

A `Checkpoint` is one consistent point of a calibration: the next block, the stats so far, the layers' tensors, the
cached activations the walk needs to continue, a Trainer snapshot (a joint or online run stopped mid-training),
the recorded block-call wiring, and whether the calibration is complete (`then`: the stage that follows the
walk, in words). `CheckpointStore` has two verbs, `save(checkpoint)` and `load()`. Files: layers-<tag>.safetensors,
acts-<tag>.safetensors, train-<tag>.safetensors (the optimizer's tensors) and state.json (the rest, and the run's
key). The tensor files are written first under new names and state.json is replaced last, so a kill at any
moment leaves the previous consistent checkpoint. No RNG state is needed: the minibatch order of a block (or of the
joint run) comes from its own generator seeded by the seed.

The store knows no job config: the run key it is opened with (jobs/runkey.py RunKey, or anything with `to_json()`
and `change(saved_json)`) says what a resume must match.
"""
import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vq4dit.utils import distributed
from vq4dit.utils.digest import file_sha256
from vq4dit.utils.errors import UserError
from vq4dit.utils.fileio import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

STATE_DIR = "calib_state"
STATE_JSON = "state.json"
LOG_NAME = "calib_log.jsonl"  # per-block stats of the calibration, one JSON line per block
CACHE_DIR = "calib_cache"  # where activations past the memory budget go, unless the config names a cache_dir
FORMAT = 3  # 3: the run key by content (2: a hash of the config, checkpoint path included; 1: DiT-only tables)


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
class Checkpoint:
    """One consistent point of a calibration. layers: {"<layer>.<tensor>": tensor} (layers_state); acts: {name:
    tensor} the cached tensors the walk needs to continue (None: the previous checkpoint's, kept); train: the
    Trainer snapshot of a joint or online run stopped mid-training (its "optimizer" a state_dict), else None;
    wiring: the recorded block calls (CalibrationSet.wiring_json; None: the previous checkpoint's); complete: every
    stage is done (the layers are the result); then: the stage that follows, in words (None: block next_block)."""

    next_block: int = 0
    stats: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    acts: dict | None = None
    train: dict | None = None
    wiring: dict | None = None
    complete: bool = False
    then: str | None = None

    @classmethod
    def final(cls, stats, layers):
        """The checkpoint of a finished calibration: its stats and every layer {name: module}."""
        return cls(len(stats), stats, layers_state(layers), {}, complete=True)

    def restore(self, layers):
        """Load the saved layers into `layers` {name: layer} (a layer saved hard is hardened first)."""
        restore_layers(layers, self.layers)

    @property
    def resume_point(self):
        """Where a rerun picks up, in words: "block B", "joint iteration I", "online trajectory T", or `then`."""
        return describe_point({"next_block": self.next_block, "then": self.then, "train_state": self.train})


class CheckpointStore:
    """The checkpoints of one output directory's calibration: <out_dir>/calib_state/.

    Opening it checks at once (before any k-means) that a checkpoint left there is this run's (its `key`: config and
    input files by content): one of another run or format is a UserError naming what changed, or is deleted when
    `overwrite`. `load()` gives the last saved Checkpoint (None: a fresh start), `save()` replaces it.
    """

    def __init__(self, out_dir, key, overwrite=False):
        self.out_dir, self.key = out_dir, key
        self.directory = state_directory(out_dir)
        self.cache_dir = os.path.join(out_dir, CACHE_DIR)
        try:
            self.meta, refused = self._read_meta(overwrite), None
        except Exception as e:  # a UserError, or rank 0's OSError deleting the state: every rank must stop
            self.meta, refused = None, e
        if distributed.active():
            # rank 0 alone speaks for the directory: every rank must stop with it before agree's collective, which
            # the others would otherwise enter alone (a gloo traceback under rank 0's one-line error)
            if distributed.all_min(refused is None) == 0:
                raise refused or UserError(f"{self.directory}: rank 0 refused the calibration state there")
            self.meta = agree(self.meta)
        elif refused is not None:
            raise refused
        self._loaded = None

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
            if change is None and meta.get("processes", 1) != distributed.size():
                change = f"it was saved by {meta.get('processes', 1)} process(es), this run has {distributed.size()}"
            change = change or self._damage(meta)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            change = f"it cannot be resumed ({type(e).__name__}: {e})".replace("\n", " ")
        if change is None:
            return meta
        if distributed.rank() == 0:  # rank 0 decides for the whole state directory (the ranks' states are in it)
            discard_state(self.out_dir, overwrite, change)
        return None

    def load(self):
        """The last saved Checkpoint, its tensors read once (a missing or corrupt file is a UserError), or None."""
        if self.meta is None:
            return None
        if self._loaded is None:
            self._loaded = self._read(self.meta)
        return self._loaded

    def _damage(self, meta):
        """What is wrong with the files state.json names, in words, or None: each must be there with the sha256 it
        recorded (a state from before digests has none), checked when the store opens, so that a damaged state is
        refused or (--overwrite) deleted as another run's is."""
        for kind, digest in (meta.get("digests") or {}).items():
            path = os.path.join(self.directory, meta[kind])
            if not os.path.isfile(path):
                return f"{meta[kind]} is missing"
            if file_sha256(path) != digest:
                return f"{meta[kind]} is not the file this run saved (its sha256 differs: corrupted or replaced)"
        return None

    def _read(self, meta):
        try:
            layers = load_file(os.path.join(self.directory, meta["layers"]))
            acts = load_file(os.path.join(self.directory, meta["acts"]))
            train = meta.get("train_state")
            if train:
                tensors = load_file(os.path.join(self.directory, meta["train"]))
                train = {**train, "optimizer": unflatten_optimizer(train["optimizer"], tensors)}
        except (OSError, KeyError, SafetensorError) as e:
            raise UserError(f"cannot resume from {self.directory} ({e}): delete it, or pass --overwrite, to start "
                            "over") from None
        return Checkpoint(meta["next_block"], list(meta["stats"]), layers, acts, train or None, meta.get("wiring"),
                          bool(meta.get("complete")), meta.get("then"))

    def save(self, checkpoint):
        """Write `checkpoint` (acts or wiring None: the previous checkpoint's) and drop the older files."""
        c, current = checkpoint, self.meta or {}
        step = "" if c.train is None else f"-{c.train['iteration']:06d}"
        tag = f"{c.next_block:05d}{step}"
        shared = distributed.active()
        if shared:  # several processes: the generation names the files, and the previous one stays until all saved
            generation = current.get("generation", -1) + 1
            tag = f"g{generation:06d}-{tag}"
        files, tensors = {"layers": f"layers-{tag}.safetensors"}, {"layers": c.layers}
        if c.acts is None and "acts" in current:
            files["acts"] = current["acts"]
        else:
            files["acts"], tensors["acts"] = f"acts-{tag}.safetensors", c.acts or {}
        train_meta = None
        if c.train is not None:
            train_meta, tensors["train"] = flatten_optimizer(c.train["optimizer"])
            train_meta, files["train"] = {**c.train, "optimizer": train_meta}, f"train-{tag}.safetensors"
        digests = {"acts": (current.get("digests") or {}).get("acts")} if "acts" not in tensors else {}
        for kind, group in tensors.items():
            with atomic_path(os.path.join(self.directory, files[kind])) as tmp:
                save_file({k: v.contiguous() for k, v in group.items()}, tmp)
                digests[kind] = file_sha256(tmp)  # checked on resume: a corrupted file must not resume silently
        self.meta = {"format": FORMAT, "run": self.key.to_json(), "next_block": c.next_block, "stats": c.stats,
                     **files, "train_state": train_meta, "complete": c.complete, "then": c.then,
                     "wiring": current.get("wiring") if c.wiring is None else c.wiring,
                     "digests": {kind: d for kind, d in digests.items() if d is not None}}
        if shared:
            self.meta.update(processes=distributed.size(), generation=generation,
                             previous={k: v for k, v in current.items() if k != "previous"} or None)
        # load() now gives what was just written without reading it back: a fresh run does not read the activations
        # it recorded (GiBs for DiT-XL/2) back from disk. Not a mid-training checkpoint: its optimizer state is live
        self._loaded = None if c.acts is None or c.train is not None else dataclasses.replace(
            c, stats=list(c.stats), wiring=self.meta["wiring"])
        write_text_atomic(os.path.join(self.directory, STATE_JSON), json.dumps(self.meta, indent=1) + "\n")
        distributed.barrier()  # every rank holds this generation: the previous one may go
        for entry in os.listdir(self.directory):
            # older checkpoints, and temporaries of a write that a SIGKILL interrupted
            if (entry.endswith(".safetensors") and entry not in files.values()) or entry.endswith(".tmp"):
                os.remove(os.path.join(self.directory, entry))

    def remove(self):
        """Delete the checkpoints once the artifact is complete (for DiT-XL/2 they hold GiBs of activations)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def state_directory(out_dir):
    """Where this process keeps its checkpoints: <out_dir>/calib_state, and under torchrun rank r > 0 in
    <out_dir>/calib_state/rank-<r> (each rank's own calibration points; removing the state removes every rank's)."""
    directory = os.path.join(out_dir, STATE_DIR)
    return directory if distributed.rank() == 0 else os.path.join(directory, f"rank-{distributed.rank()}")


def agree(meta):
    """The state.json content (or None: start over) that every rank resumes from. A kill can stop the ranks' saves of
    one generation part way: some ranks hold generation g + 1 (and g as "previous", whose files a rank deletes only
    once every rank has saved g + 1), others g; all go back to g. No state on some rank: all start over."""
    generation = -1 if meta is None else meta.get("generation", -1)
    low = distributed.all_min(generation)
    if low < 0:
        return None
    if generation == low:
        return meta
    previous = meta.get("previous")
    if generation == low + 1 and previous is not None and previous.get("generation") == low:
        logger.info("rank %d resumes from its previous checkpoint, the last one every rank saved", distributed.rank())
        return {**previous, "previous": None}
    logger.warning("the ranks' calibration states are more than one save apart: starting over")
    return None


def restore(checkpoints, layers):
    """Load the last checkpoint's layers into `layers` (none saved: they stay as they are); returns (its stats, its
    Trainer snapshot or None). The checkpoint itself is not kept: its tables would outlive the blocks that free them."""
    saved = checkpoints.load()
    if saved is None:
        return [], None
    saved.restore(layers)
    return saved.stats, saved.train


class CalibLog:
    """<out_dir>/calib_log.jsonl: one JSON line per calibrated block (or stage), with the mode that wrote it. Until
    the run's artifact is written the lines go to the calibration state (<out_dir>/calib_state/calib_log.jsonl), so
    an interrupted rerun leaves the log of the artifact already there as it was; `publish` moves them beside the new
    artifact. Under torchrun rank 0 writes it (every rank has the same stats)."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, LOG_NAME)
        self.working = os.path.join(out_dir, STATE_DIR, LOG_NAME)

    def remove(self):
        """Delete the log (an earlier run's, beside a result it no longer describes)."""
        if distributed.rank() == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def clear(self):
        if distributed.rank() == 0:
            os.makedirs(os.path.dirname(self.working), exist_ok=True)
            write_text_atomic(self.working, "")

    def append(self, mode, records):
        """Rewritten atomically (the log is small) so a kill never leaves half a line."""
        if distributed.rank() != 0:
            return
        # no working log yet: a state saved before the log moved into it (its lines so far are beside the artifact)
        source = self.working if os.path.exists(self.working) else self.path
        old = open(source).read() if os.path.exists(source) else ""
        write_text_atomic(self.working, old + "".join(json.dumps({"mode": mode, **r}) + "\n" for r in records))

    def publish(self):
        """The artifact this run calibrated is written: its log replaces the one beside it (none kept: the earlier
        log goes, it described another result)."""
        if distributed.rank() != 0:
            return
        if os.path.exists(self.working):
            os.replace(self.working, self.path)
        else:
            self.remove()


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
        joint = (meta.get("run") or {}).get("config", {}).get("calib") == "joint"
        if not train and joint:  # joint training's first save comes CHECKPOINT_SECONDS in: until then, the recording
            return "the recorded calibration set (joint training starts over)"
        if not train:
            return f"block {int(meta['next_block'])}"
        if "trajectory" in train:
            return f"online trajectory {int(train['trajectory'])}"
        from vq4dit.calib.joint import CHECKPOINT_SECONDS

        return (f"joint iteration {int(train['iteration'])} (saved at most every {CHECKPOINT_SECONDS // 60} minutes: "
                "the updates since are made again)")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
