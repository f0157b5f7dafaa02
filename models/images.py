"""Sampling to files: a class-sorted, labelled grid PNG and an ADM-format samples.npz.

samples.npz: arr_0 uint8 (N, H, W, 3) in sample-index order, arr_1 int64 labels (N,).
"""
import logging
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from models import distributed
from models.precision import apply_precision, resolve_precision
from models.sampler import class_labels, generate
from models.vae import load_vae, needs_vae, to_uint8
from utils.errors import UserError
from utils.fileio import atomic_path

logger = logging.getLogger(__name__)
NUM_TIMESTEPS = 1000  # the training schedule that sampling respaces


def save_npz(path, images, labels):
    """Write arr_0 (N, H, W, 3) uint8 and arr_1 (N,) labels atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=np.asarray(images, dtype=np.uint8), arr_1=np.asarray(labels, dtype=np.int64))


def make_grid(images, labels, max_cols=16, min_tile=64, pad=2, max_samples=256, max_class_rows=16):
    """PIL grid of the first `max_samples` images (a 50k-sample ImageNet run must not build a gigapixel PNG).

    With at most `max_class_rows` classes among them: one row per class (wrapping after max_cols), classes
    ascending, each row labelled on the left. With more (ImageNet): the images sorted by class, max_cols per
    row, unlabelled. images: uint8 (N, H, W, 3); small images are upscaled (nearest) to at least `min_tile` px.
    """
    images, labels = np.asarray(images)[:max_samples], np.asarray(labels)[:max_samples]
    h, w = images.shape[1:3]
    scale = max(1, -(-min_tile // h))
    th, tw = h * scale, w * scale
    rows = []  # (row label, indices of that row)
    if len(np.unique(labels)) <= max_class_rows:
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)  # stable: sample-index order within a class
            rows += [(str(c), idx[s:s + max_cols]) for s in range(0, len(idx), max_cols)]
    else:
        idx = np.argsort(labels, kind="stable")
        rows = [("", idx[s:s + max_cols]) for s in range(0, len(idx), max_cols)]
    cols = max((len(r) for _, r in rows), default=1)
    font = ImageFont.load_default()
    margin = 8 + max((int(font.getlength(text)) for text, _ in rows), default=8)
    grid = Image.new("RGB", (margin + cols * (tw + pad) + pad, len(rows) * (th + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (text, idx) in enumerate(rows):
        y = pad + r * (th + pad)
        draw.text((4, y + th // 2 - 6), text, fill=(0, 0, 0), font=font)
        for j, i in enumerate(idx):
            tile = Image.fromarray(images[i]).resize((tw, th), Image.NEAREST)
            grid.paste(tile, (margin + pad + j * (tw + pad), y))
    return grid


def save_grid(path, images, labels, **kwargs):
    with atomic_path(path) as tmp:
        make_grid(images, labels, **kwargs).save(tmp, format="PNG")


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


def parse_classes(text, num_classes):
    """'1,3,5' -> [1, 3, 5], each in 0..num_classes-1; None/'' -> None (uniform random labels)."""
    if not text:
        return None
    valid = f"class ids are integers in 0..{num_classes - 1}"
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--classes {text!r}: expected a comma-separated list like 0,1,2; {valid}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--classes {text!r}: {', '.join(map(str, bad))} out of range; {valid}")
    if not classes:
        raise UserError(f"--classes {text!r}: no class ids given; {valid}")
    return classes


def check_sampling_args(num_samples, steps, batch_size):
    """UserError naming the first of the sampling counts that is out of range."""
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if not 1 <= steps <= NUM_TIMESTEPS:
        raise UserError(f"--steps {steps}: must be in 1..{NUM_TIMESTEPS} (respaced DDPM steps)")


def sample_images(model, num_samples, classes=None, seed=0, steps=50, cfg_scale=1.5, batch_size=64, device="cpu",
                  vae=None, progress=True):
    """uint8 images (N, H, W, 3) and labels (N,) of this process's shard (all samples when not distributed).

    Images depend only on (seed, sample index), not on batch size or the number of processes.
    """
    rank, size = distributed.world()
    labels = class_labels(seed, num_samples, model.num_classes, classes)
    positions = distributed.shard(num_samples, rank, size, block=batch_size)
    images = []
    for start in range(0, len(positions), batch_size):
        idx = positions[start:start + batch_size]
        x = generate(model, labels[torch.as_tensor(idx)], [int(i) for i in idx], seed, steps, cfg_scale, batch_size,
                     device, progress=progress and rank == 0)
        images.append(to_uint8(x, vae))
    shape = (model.input_size * (8 if needs_vae(model.in_channels) else 1),) * 2
    local = np.concatenate(images) if images else np.zeros((0, *shape, 3), np.uint8)
    return local, labels.numpy()


def sample_to_dir(model, out_dir, num_samples=16, classes=None, seed=0, steps=50, cfg_scale=1.5, batch_size=64,
                  device="cpu", vae="ema", progress=True, precision=None):
    """Sample `model` and write out_dir/grid.png and out_dir/samples.npz; returns (images, labels) on rank 0.

    Under torchrun the sample indices are sharded over ranks and rank 0 writes the gathered result,
    identical to a single-process run. `vae` (ema | mse | directory) is used only by latent models.
    precision: fp32 | tf32 | bf16 | fp16, None for the device's default (models/precision.py); the model is
    moved and cast in place.
    """
    check_sampling_args(num_samples, steps, batch_size)
    device = distributed.init(device)
    model = apply_precision(model.to(device).eval(), resolve_precision(precision, device), device)
    decoder = load_vae(vae, device) if needs_vae(model.in_channels) else None
    start = time.time()
    local, labels = sample_images(model, num_samples, classes, seed, steps, cfg_scale, batch_size, device,
                                  decoder, progress)
    images = distributed.gather_rows(local, num_samples, device, block=batch_size)
    rank, _ = distributed.world()
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_npz(os.path.join(out_dir, "samples.npz"), images, labels)
        save_grid(os.path.join(out_dir, "grid.png"), images, labels)
        logger.info("wrote %d samples to %s in %.1f s", num_samples, out_dir, time.time() - start)
    distributed.shutdown()
    return (images, labels) if rank == 0 else (None, None)
