"""The sample job: load a full-precision model or a quantized artifact, draw images, write grid.png and samples.npz.

Works for every model family an adapter describes (models/adapters): the project's DiT with its own sampler, a
diffusers pipeline's transformer through that pipeline. Under torchrun the sample indices are sharded over ranks
(blocks of batch_size, dealt round-robin) and rank 0 writes the gathered result.
"""
import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vq4dit.jobs.sample_state import (
    STATE_DIR,
    kept_on_failure,
    open_shared_state,
    samples_of_run,
    sampling_key,
)
from vq4dit.models.adapters import adapter_for
from vq4dit.models.adapters.dit import DiTAdapter
from vq4dit.models.adapters.load import load_model
from vq4dit.models.pipelines import check_pipeline_flags
from vq4dit.models.vae import needs_vae
from vq4dit.utils import distributed
from vq4dit.utils.cli import check_sampling_args
from vq4dit.utils.digest import json_digest, prompts_digest
from vq4dit.utils.errors import NonFiniteOutput, RankError, UserError
from vq4dit.utils.fileio import check_free_space
from vq4dit.utils.imagefiles import (
    GRID_FILE,
    NPZ_FILE,
    RUN_KEY,
    VIDEO_DIR,
    npz_bytes,
    sample_files_bytes,
    save_samples,
    save_videos,
)
from vq4dit.utils.outdir import claim_out_dir
from vq4dit.utils.precision import apply_precision, resolve_precision

logger = logging.getLogger(__name__)


class Loaded(NamedTuple):
    """A model ready to sample: the network (eval mode, in its precision, on its device), its adapter, and the
    reference's extra keys (a diffusers pipeline's record, ...)."""

    model: nn.Module
    adapter: object
    extra: dict


@dataclass(frozen=True)
class FPSource:
    """A full-precision model, as sample.py's --model, --ckpt, --image-size, --num-classes and --backend name it
    (None: read from the checkpoint; no ckpt: the embedded digits model)."""

    model: str | None = None
    ckpt: str | None = None
    image_size: int | None = None
    num_classes: int | None = None
    backend: str = "auto"


@dataclass(frozen=True)
class Request:
    """What to draw: `num_samples` samples, with these classes or prompts (None: the adapter's default conditions)."""

    num_samples: int
    classes: list | None = None
    prompts: list | None = None


def load_for_sampling(quantized=None, source=FPSource(), device="cpu", decode=False, precision=None):
    """The Loaded model of a quantized artifact (`quantized`: a directory or a hub repo id) or else of the
    full-precision FPSource `source`."""
    from vq4dit.vq import load_quantized
    from vq4dit.vq.artifact import resolve_artifact

    if quantized:  # a directory, or a hub repo id holding an artifact (through huggingface_hub's cache)
        net, ref, _ = load_quantized(resolve_artifact(quantized), device, decode=decode)
        adapter, extra = adapter_for(net), {k: v for k, v in ref.items() if k not in ("class", "config")}
    else:
        dit_flags = {"--model": source.model, "--image-size": source.image_size, "--num-classes": source.num_classes}
        check_pipeline_flags(source.ckpt, source.backend, dit_flags)
        base = load_model(source.model, source.ckpt, source.image_size, source.num_classes, source.backend, device)
        net, adapter, extra = base.model, base.adapter, base.extra
    return Loaded(apply_precision(net.eval(), resolve_precision(precision, device), device), adapter, extra)


def _take(conditions, idx):
    return conditions[torch.as_tensor(idx)] if torch.is_tensor(conditions) else [conditions[i] for i in idx]


def check_memory(num_samples, size):
    """Refuse, before sampling, a count whose samples rank 0 could not hold: the gathered (N, H, W, 3) or
    (N, F, H, W, 3) uint8 array and the concatenation that builds it, against the machine's physical memory."""
    needed = 2 * npz_bytes(num_samples, size)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > total:
        what = f"images of {size[0]}x{size[1]}" if len(size) == 2 else \
            f"videos of {size[0]} frames of {size[1]}x{size[2]}"
        raise UserError(f"--num-samples {num_samples}: {num_samples:,} {what} need about "
                        f"{needed // 2**20:,} MiB of memory; this machine has {total // 2**20:,} MiB; give at most "
                        f"{num_samples * total // needed:,}")


@contextlib.contextmanager
def claim_sample_dir(out_dir, overwrite=False):
    """utils.outdir.claim_out_dir for a sample directory, as quantize.py's --out is claimed: locked for the run, and
    files sample.py did not write refused unless `overwrite` (and kept then). An unmarked directory holding the
    samples.npz and grid.png of a run from before markers existed is sample.py's own (sample_to_dir replaces its
    samples with a warning)."""
    def earlier(directory):
        return all(os.path.isfile(os.path.join(directory, name)) for name in (NPZ_FILE, GRID_FILE))

    with claim_out_dir(out_dir, (NPZ_FILE, GRID_FILE, VIDEO_DIR, STATE_DIR), overwrite, "--overwrite", earlier,
                       "sample.py's samples"):
        yield


def prepare_sampler(loaded, num_samples, settings, device):
    """The adapter's ImageSampler, once the counts are known to be valid and the images to fit in memory."""
    check_sampling_args(num_samples, settings.steps, settings.batch_size, settings.seed, settings.cfg_scale)
    sized = [flag for flag, value in (("--height", settings.height), ("--width", settings.width)) if value]
    if sized and loaded.adapter.num_classes(loaded.model) is not None:
        raise UserError(f"{', '.join(sized)}: {loaded.adapter.describe(loaded.model)} samples at the size it was "
                        "trained at (text-to-image and video pipelines take a size); drop them")
    sampler = loaded.adapter.image_sampler(loaded.model, loaded.extra, settings, device)
    if settings.num_frames is not None and len(sampler.size) != 3:  # (F, H, W) for videos, (H, W) for images
        raise UserError(f"--num-frames {settings.num_frames}: {loaded.adapter.describe(loaded.model)} draws images, "
                        "not videos; drop --num-frames")
    check_memory(num_samples, sampler.size)
    return sampler


def conditions_of(loaded, request, seed):
    """(every sample's condition, labels (N,) int64) of the Request `request`, drawn from `seed` where not given."""
    return loaded.adapter.conditions(loaded.model, request.num_samples, seed, request.classes, request.prompts)


def check_vae_flag(vae, adapter, model):
    """--vae names the decoder of the project's latent DiTs: with any other model it would do nothing."""
    if vae is not None and not (adapter.family == DiTAdapter.family and needs_vae(model.in_channels)):
        raise UserError(f"--vae {vae}: not used by {adapter.describe(model)} (only the project's latent DiTs decode "
                        "with --vae; pixel-space DiTs have no VAE, diffusers pipelines bring their own); drop --vae")


def _out_of_memory(error):
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def draw_shard(sampler, conditions, num_samples, batch_size, state=None, progress=False):
    """uint8 images (n_local, H, W, 3) of this process's shard of the `num_samples` samples; `state`: a
    jobs.sample_state.SampleState whose kept samples are taken instead of drawn, and which keeps each batch drawn.
    `progress`: rank 0 shows one bar of its shard's samples (all of them in one process) for the whole run, the kept
    ones counted from the start, so that its time left is the drawing's."""
    rank, size = distributed.world()
    positions = distributed.shard(num_samples, rank, size, block=batch_size)
    images = []
    kept = set(state.parts) if state is not None else set()
    with tqdm(total=len(positions), initial=sum(int(i) in kept for i in positions), desc="sampling", unit="sample",
              disable=not progress or rank != 0) as bar:
        for start in range(0, len(positions), batch_size):
            idx = [int(i) for i in positions[start:start + batch_size]]
            images.append(_draw_batch(sampler, conditions, idx, state, batch_size))
            bar.update(sum(i not in kept for i in idx))
    return np.concatenate(images) if images else np.zeros((0, *sampler.size, 3), np.uint8)


def _draw_batch(sampler, conditions, idx, state, batch_size):
    """draw_shard's images of the samples `idx`: those `state` kept taken, the rest drawn (and kept)."""
    kept = state.take(idx) if state is not None else {}
    todo = [i for i in idx if i not in kept]  # a batch partly kept draws the rest only
    try:
        drawn = sampler(todo, _take(conditions, todo)) if todo else None
    except NonFiniteOutput as e:
        raise RankError(f"samples {idx[0]}..{idx[-1]}: {e}: an overflow (a LoRA scale, the guidance "
                        "scale --cfg-scale or --precision fp16 too large for this model); refusing to write black "
                        "images") from None
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        raise RankError(f"--batch-size {batch_size}: out of memory drawing {len(idx)} samples at once "
                        f"({type(e).__name__}); lower --batch-size") from None
    if state is not None and todo:
        state.keep(todo, drawn)
    if kept:
        kept.update(zip(todo, drawn if todo else ()))
        drawn = np.stack([kept[i] for i in idx])
    return drawn


def sample_shard(loaded, request, settings, device):
    """(uint8 images (n_local, H, W, 3) of this process's shard, labels (N,) int64 for all samples) of the Loaded
    model `loaded` for the Request `request`."""
    sampler = prepare_sampler(loaded, request.num_samples, settings, device)
    conditions, labels = conditions_of(loaded, request, settings.seed)
    return draw_shard(sampler, conditions, request.num_samples, settings.batch_size, progress=settings.progress), labels


def save_all(out_dir, images, labels, settings, prompts=None, run_key=None):
    """samples.npz (with the SampleSettings `settings` the images depend on), grid.png and, for videos
    (N, F, H, W, 3), the frames and mp4s in out_dir/videos: all or none. prompts: each sample's prompt (a
    text-to-image model: the labels are prompt indices, and a digest of the prompts is recorded, so that a reference
    drawn from other prompts is refused), None for class labels."""
    videos = os.path.join(out_dir, VIDEO_DIR)
    if images.ndim == 5:
        save_videos(videos, images)
    sampling = {"seed": settings.seed, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
                "num_frames": images.shape[1] if images.ndim == 5 else None, "vae": settings.vae}  # frames drawn
    if prompts is not None:
        sampling["prompts"] = prompts_digest(prompts)
    if run_key is not None:
        sampling[RUN_KEY] = run_key
    try:
        save_samples(out_dir, images, labels, prompts is not None, sampling)
    except BaseException:
        if images.ndim == 5:
            shutil.rmtree(videos, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Resume:
    """Keep each batch drawn in out_dir/sample_state until the samples are written, and take the batches an
    interrupted run kept (jobs/sample_state.py): `source` is sample_state.source_key's record of the model;
    `overwrite` drops the state of a run with another key instead of refusing it; `skip_existing` keeps the samples
    already in out_dir when this same run (its key) wrote them, and draws nothing."""

    source: dict
    overwrite: bool = False
    skip_existing: bool = False


def sample_to_dir(loaded, out_dir, request, settings, device="cpu", resume=None):
    """Sample the Loaded model `loaded` for the Request `request` and write out_dir/grid.png and out_dir/samples.npz
    (videos: arr_0 (N, F, H, W, 3), frames and mp4s in out_dir/videos, the grid of first frames), all or (on any
    error, a full disk, an interrupt) none of them; returns (images, labels) on rank 0, else (None, None). A sample's
    image depends only on the seed, its index and its condition (DiT: bitwise, whatever the batch size or the number
    of processes). `resume`: a Resume, to keep the drawn batches for a rerun (sample.py's). sample.py claims out_dir
    first (claim_sample_dir)."""
    start, num_samples = time.time(), request.num_samples
    sampler = prepare_sampler(loaded, num_samples, settings, device)
    rank, _ = distributed.world()
    conditions, labels = conditions_of(loaded, request, settings.seed)
    state = key = None
    if resume is not None:
        key = sampling_key(resume.source, request, settings, device)
        kept = samples_of_run(out_dir, key) if resume.skip_existing else None
        if kept is not None:
            logger.info("%s: holds the samples of this run (the same model files and settings); kept "
                        "(--skip-existing)", out_dir)
            distributed.shutdown()
            return kept if rank == 0 else (None, None)
        state = open_shared_state(out_dir, key, resume.overwrite, sampler.size)
    if rank == 0 and os.path.isfile(os.path.join(out_dir, NPZ_FILE)):
        logger.warning("%s: replacing the %s there (an earlier run's samples)", out_dir, NPZ_FILE)
    with kept_on_failure(state.directory) if state is not None and rank == 0 else contextlib.nullcontext():
        if rank == 0:  # a full disk fails now, not after hours of sampling
            parts = (num_samples - len(state)) * 3 * math.prod(sampler.size) if state is not None else 0  # videos too
            check_free_space(out_dir, sample_files_bytes(labels, sampler.size) + parts,
                             f"{NPZ_FILE} and {GRID_FILE}" + (" with the batches kept until then" if parts else ""))
        local = draw_shard(sampler, conditions, num_samples, settings.batch_size, state, settings.progress)
        images = distributed.gather_rows(local, num_samples, device, block=settings.batch_size)
        if rank == 0:
            prompted = loaded.adapter.num_classes(loaded.model) is None
            save_all(out_dir, images, labels, settings, conditions if prompted else None,
                     None if key is None else json_digest(key))
    if rank == 0:
        if state is not None:
            shutil.rmtree(state.directory, ignore_errors=True)
        logger.info("wrote %d samples to %s in %.1f s", num_samples, out_dir, time.time() - start)
    distributed.shutdown()
    return (images, labels) if rank == 0 else (None, None)
