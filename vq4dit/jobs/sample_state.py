"""Resuming sample.py: each batch of samples drawn is kept in OUT/sample_state until samples.npz is written, so an
interrupted run (Ctrl-C, a kill, a lost node, an out-of-memory batch) rerun with the same command draws only the
samples it had not drawn, and writes the samples.npz an uninterrupted run writes.

A sample's image depends only on the seed, its index and its condition (jobs/sample.py), so a kept image is the one
a rerun would draw. The state records the key of what the images depend on (the model's files by content, the
LoRAs, the precision, the device type, the sampling settings and the request); a rerun under another key is refused,
naming what changed, and --overwrite drops the state and starts over. The batch size and the number of processes are
not in the key: a rerun after an out-of-memory batch may lower --batch-size and keep what was drawn.

Files: key.json, and one part-<first index>-<count>.npz per batch (arrays `indices` (n,) int64 and `images`
(n, H, W, 3) or (n, F, H, W, 3) uint8), each written atomically; under torchrun every process keeps its own batches.
"""
import contextlib
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import asdict

import numpy as np

from vq4dit.jobs.runkey import Input
from vq4dit.models.loading import embedded_ckpt_path
from vq4dit.utils import distributed
from vq4dit.utils.digest import json_digest, prompts_digest
from vq4dit.utils.errors import UserError
from vq4dit.utils.fileio import atomic_path, write_text_atomic
from vq4dit.utils.imagefiles import GRID_FILE, NPZ_FILE, RUN_KEY, VIDEO_DIR
from vq4dit.vq.artifact import MODEL_FILE, QUANT_FILE

logger = logging.getLogger(__name__)

STATE_DIR = "sample_state"
KEY_FILE = "key.json"
PART = re.compile(r"part-(\d+)-(\d+)\.npz")


def source_key(quantized, source, loras=(), precision=None, decode=False):
    """What sample.py's model depends on, JSON-able: a quantized artifact's two files (`quantized`: its local
    directory, a hub repo's cached snapshot as vq.artifact.resolve_artifact gives it) or the full-precision checkpoint
    (jobs.sample.FPSource `source`), each by content (runkey.Input), the LoRAs (LoraSpec) by content and scale (a
    hub LoRA by its name), the precision and the weight decode. The artifact's files by name and content only: the
    same artifact at another path (a hub repo's snapshot after a commit that changed only its model card) is the
    same model."""
    if quantized:
        model = {"quantized": [{"file": n, "digest": Input.of("artifact", os.path.join(quantized, n)).digest}
                               for n in (MODEL_FILE, QUANT_FILE)]}
    else:
        ckpt = source.ckpt if source.ckpt is not None else str(embedded_ckpt_path())
        model = {**asdict(source), "ckpt": asdict(Input.of("checkpoint", ckpt))}
    return {"model": model, "loras": [[asdict(Input.of("LoRA", lora.source)), lora.scale] for lora in loras],
            "precision": precision, "decode_weights": decode}


def sampling_key(source, request, settings, device):
    """The key of a run: `source` (source_key), the Request, the SampleSettings the images depend on and the device
    type (a CPU and a GPU draw other roundings)."""
    digest = None if request.prompts is None else prompts_digest(request.prompts)
    drawn = {k: v for k, v in asdict(settings).items() if k not in ("batch_size", "progress")}
    key = {"source": source, "num_samples": request.num_samples, "classes": request.classes, "prompts": digest,
           "settings": drawn, "device": str(device).split(":")[0]}
    return json.loads(json.dumps(key))


def samples_of_run(out_dir, key):
    """(images, labels) of the samples in out_dir when the run that wrote them had the sampling key `key` (the
    run_key samples.npz records) and grid.png (and videos/, for videos) is beside them; else None."""
    from vq4dit.evaluation.samples import load_samples, sampling_of

    npz = os.path.join(out_dir, NPZ_FILE)
    if not (os.path.isfile(npz) and os.path.isfile(os.path.join(out_dir, GRID_FILE))):
        return None
    try:
        if (sampling_of(npz) or {}).get(RUN_KEY) != json_digest(key):
            return None
        images, labels = load_samples(npz)
    except UserError:  # unreadable: drawn again
        return None
    return None if images.ndim == 5 and not os.path.isdir(os.path.join(out_dir, VIDEO_DIR)) else (images, labels)


def _change(saved, key, path=""):
    """The first difference of two keys in words ("settings.seed 0 -> 1"), or None."""
    if isinstance(saved, dict) and isinstance(key, dict):
        for name in sorted(saved.keys() | key.keys()):
            found = _change(saved.get(name), key.get(name), f"{path}.{name}" if path else name)
            if found:
                return found
        return None
    return None if saved == key else f"{path} {saved!r} -> {key!r}"


def open_state(out_dir, key, overwrite=False):
    """Rank 0, before drawing: the state directory of `out_dir` for `key`, created (key.json) when there is none;
    a state saved under another key is a UserError naming what changed, or with `overwrite` removed first."""
    directory = os.path.join(out_dir, STATE_DIR)
    path = os.path.join(directory, KEY_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None  # none, or a run killed before its key was written: its parts cannot be trusted
    if saved is not None and saved != key:
        if not overwrite:
            raise UserError(f"{directory}: holds samples of another sample.py run ({_change(saved, key)}); rerun "
                            "that command to finish it, or pass --overwrite to drop them and start over")
        logger.warning("%s: dropping the samples of another run (--overwrite): %s", directory, _change(saved, key))
    if saved != key:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        try:
            write_text_atomic(path, json.dumps(key, sort_keys=True) + "\n")
        except BaseException:  # a full disk: no state without its key left behind
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return directory


def open_shared_state(out_dir, key, overwrite, size):
    """Every process's SampleState of out_dir for `key` and images of `size`, opened (checked, created: open_state)
    by rank 0 first."""
    directory = os.path.join(out_dir, STATE_DIR)
    if distributed.world()[0] == 0:
        open_state(out_dir, key, overwrite)
    distributed.barrier()
    state = SampleState(directory, size)
    if len(state) and distributed.world()[0] == 0:
        logger.info("resuming: %d samples kept in %s", len(state), directory)
    return state


class SampleState:
    """The kept batches of a run in `directory` (open_state's): take() the kept images of a batch, keep() a batch
    drawn. Every process reads the parts on disk when it starts drawing."""

    def __init__(self, directory, size):
        self.directory, self.size = directory, tuple(size)
        self.parts = {}  # sample index -> part file
        for name, indices in kept_parts(directory).items():
            self.parts.update(dict.fromkeys(indices, name))
        self._cached = (None, None)

    def _read(self, name):
        """(indices, images) of a part; None, with a warning, when it cannot be read or does not hold what its name
        says (the state's image size, uint8, the indices of its name)."""
        if self._cached[0] != name:
            path, part = os.path.join(self.directory, name), None
            try:
                with np.load(path, allow_pickle=False) as f:
                    indices, images = f["indices"], f["images"]
                if images.dtype == np.uint8 and images.shape == (len(indices), *self.size, 3) and \
                        list(indices) == list(part_indices(name)):
                    part = indices, images
                else:
                    logger.warning("%s: holds %s %s images of samples %s..., not what its name says; drawing its "
                                   "samples again", path, images.dtype, images.shape, indices[:1].tolist())
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                logger.warning("%s: unreadable (%s); drawing its samples again", path, e)
            self._cached = (name, part)
        return self._cached[1]

    def take(self, idx):
        """{index: uint8 image} of the samples of `idx` (a list of indices) that were kept."""
        found = {}
        for i in idx:
            name = self.parts.get(i)
            part = None if name is None else self._read(name)
            if part is not None:
                found[i] = part[1][i - int(part[0][0])]
            elif name is not None:  # dropped: its samples are drawn again
                os.remove(os.path.join(self.directory, name))
                self.parts = {j: n for j, n in self.parts.items() if n != name}
        return found

    def keep(self, idx, images):
        """Keep the drawn `images` of the samples `idx`: a part per run of consecutive indices."""
        start = 0
        for end in range(1, len(idx) + 1):
            if end == len(idx) or idx[end] != idx[end - 1] + 1:
                name = f"part-{idx[start]}-{end - start}.npz"
                with atomic_path(os.path.join(self.directory, name), needed=images[start:end].nbytes) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, indices=np.asarray(idx[start:end], dtype=np.int64), images=images[start:end])
                start = end

    def __len__(self):
        return len(self.parts)


def part_indices(name):
    """The sample indices a part file's name says it holds (PART: part-<first index>-<count>.npz)."""
    start, count = map(int, PART.fullmatch(name).groups())
    return range(start, start + count)


def kept_parts(directory):
    """{part file: its sample indices} of the state `directory`, every process's, in name order ({} without one)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    return {name: part_indices(name) for name in names if PART.fullmatch(name)}


def kept_count(directory):
    """The samples kept in the state `directory` by every process (0 when there is none)."""
    return sum(len(indices) for indices in kept_parts(directory).values())


@contextlib.contextmanager
def kept_on_failure(directory):
    """Rank 0, around the drawing and the writing: on an error or interrupt inside, a state that kept no sample is
    removed (the run leaves nothing behind), and one that did stays for a rerun, which a UserError then says."""
    try:
        yield
    except BaseException as e:
        kept = kept_count(directory)
        if not kept:
            shutil.rmtree(directory, ignore_errors=True)
        elif isinstance(e, UserError):
            raise type(e)(f"{e}; {kept} samples kept in {directory}: a rerun with the same flags (any "
                          "--batch-size) draws only the rest") from None  # a RankError stays one
        raise


def resume_hint(out_dir):
    """sample.py's words after an interrupt: how many samples are kept for a rerun, or that nothing was written."""
    directory = os.path.join(out_dir, STATE_DIR)
    kept = kept_count(directory)
    if not kept:
        return f"nothing written to {out_dir}"
    return f"{kept} samples kept in {directory}; rerun the same command to draw the rest"
