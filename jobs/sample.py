"""The sample job: load a full-precision model or a quantized artifact, draw images, write grid.png and samples.npz.

Works for every model family an adapter describes (models/adapters): the project's DiT with its own sampler, a
diffusers pipeline's transformer through that pipeline. Under torchrun the sample indices are sharded over ranks
(blocks of batch_size, dealt round-robin) and rank 0 writes the gathered result.
"""
import logging
import os
import time

import numpy as np
import torch

from models.adapters import adapter_for
from models.adapters.load import load_model
from utils import distributed
from utils.cli import check_sampling_args
from utils.imagefiles import save_grid, save_npz, save_videos
from utils.precision import apply_precision, resolve_precision

logger = logging.getLogger(__name__)


def load_for_sampling(quantized=None, model=None, ckpt=None, image_size=None, num_classes=None, backend="auto",
                      device="cpu", decode=False, precision=None):
    """(model on `device` in its precision, adapter, the reference's extra keys) for a quantized artifact directory
    (`quantized`) or a full-precision checkpoint / pipeline (`model`, `ckpt`, ...)."""
    from vq import load_quantized

    if quantized:
        net, ref, _ = load_quantized(quantized, device, decode=decode)
        adapter, extra = adapter_for(net), {k: v for k, v in ref.items() if k not in ("class", "config")}
    else:
        base = load_model(model, ckpt, image_size, num_classes, backend, device)
        net, adapter, extra = base.model, base.adapter, base.extra
    return apply_precision(net.eval(), resolve_precision(precision, device), device), adapter, extra


def _take(conditions, idx):
    return conditions[torch.as_tensor(idx)] if torch.is_tensor(conditions) else [conditions[i] for i in idx]


def sample_shard(model, adapter, extra, num_samples, settings, device, classes=None, prompts=None):
    """(uint8 images (n_local, H, W, 3) of this process's shard, labels (N,) int64 for all samples)."""
    conditions, labels = adapter.conditions(model, num_samples, settings.seed, classes, prompts)
    sampler = adapter.image_sampler(model, extra, settings, device)
    rank, size = distributed.world()
    positions = distributed.shard(num_samples, rank, size, block=settings.batch_size)
    images = []
    for start in range(0, len(positions), settings.batch_size):
        idx = [int(i) for i in positions[start:start + settings.batch_size]]
        images.append(sampler(idx, _take(conditions, idx)))
    local = np.concatenate(images) if images else np.zeros((0, *sampler.size, 3), np.uint8)
    return local, labels


def sample_to_dir(model, adapter, extra, out_dir, num_samples, settings, device="cpu", classes=None, prompts=None):
    """Sample and write out_dir/grid.png and out_dir/samples.npz (videos: arr_0 (N, F, H, W, 3), frames and mp4s in
    out_dir/videos, the grid of first frames); returns (images, labels) on rank 0, else
    (None, None). A sample's image depends only on the seed, its index and its condition (DiT: bitwise, whatever
    the batch size or the number of processes)."""
    check_sampling_args(num_samples, settings.steps, settings.batch_size)
    start = time.time()
    local, labels = sample_shard(model, adapter, extra, num_samples, settings, device, classes, prompts)
    images = distributed.gather_rows(local, num_samples, device, block=settings.batch_size)
    rank, _ = distributed.world()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_npz(os.path.join(out_dir, "samples.npz"), images, labels)
        if images.ndim == 5:  # videos (N, F, H, W, 3): frames (and mp4s) per sample, the grid of first frames
            save_videos(os.path.join(out_dir, "videos"), images)
        save_grid(os.path.join(out_dir, "grid.png"), images[:, 0] if images.ndim == 5 else images, labels)
        logger.info("wrote %d samples to %s in %.1f s", num_samples, out_dir, time.time() - start)
    distributed.shutdown()
    return (images, labels) if rank == 0 else (None, None)
