"""Sampled images as files: a class-sorted, labelled grid PNG and the ADM evaluator's samples.npz.

samples.npz: arr_0 uint8 (N, H, W, 3) in sample-index order, arr_1 int64 labels (N,) (class ids, or prompt
indices for text-to-image models).
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vq4dit.utils.fileio import atomic_path, atomic_paths

NPZ_FILE, GRID_FILE = "samples.npz", "grid.png"
GRID_SAMPLES = 256  # make_grid's max_samples
ARCHIVE_OVERHEAD = 4096  # bytes: the zip and .npy headers of samples.npz


def npz_bytes(num_samples, size):
    """Bytes of samples.npz for `num_samples` images of `size` (H, W) (np.savez stores them uncompressed)."""
    return num_samples * (size[0] * size[1] * 3 + 8) + ARCHIVE_OVERHEAD


def sample_files_bytes(num_samples, size, min_tile=64, pad=2):
    """An upper bound on the bytes of samples.npz + grid.png for make_grid's defaults: the grid as raw RGB plus 1%
    (PNG's worst case on noise). Its rows hold at most max_cols = 16 tiles and at most 16 rows are partly empty, so
    it spans at most n + 256 tiles, plus the label margin (< 64 px wide) beside at most 32 rows."""
    scale = max(1, -(-min_tile // size[0]))
    th, tw = size[0] * scale + pad, size[1] * scale + pad
    grid = (min(num_samples, GRID_SAMPLES) + 256) * th * tw * 3 + 32 * th * 64 * 3
    return npz_bytes(num_samples, size) + grid * 101 // 100


def save_samples(out_dir, images, labels):
    """out_dir/samples.npz and out_dir/grid.png, both or (on any error, e.g. a full disk) neither. Videos
    (N, F, H, W, 3): the npz holds them whole, the grid shows their first frames."""
    images = np.asarray(images, dtype=np.uint8)
    stills = images[:, 0] if images.ndim == 5 else images
    paths = [os.path.join(out_dir, NPZ_FILE), os.path.join(out_dir, GRID_FILE)]
    needed = sample_files_bytes(len(images), stills.shape[1:3]) + images.nbytes - stills.nbytes  # videos: all frames
    with atomic_paths(paths, needed=needed) as (npz_tmp, grid_tmp):
        with open(npz_tmp, "wb") as f:
            np.savez(f, arr_0=images, arr_1=np.asarray(labels, dtype=np.int64))
        make_grid(stills, labels).save(grid_tmp, format="PNG")


def make_grid(images, labels, max_cols=16, min_tile=64, pad=2, max_samples=GRID_SAMPLES, max_class_rows=16):
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


def save_videos(directory, videos, fps=8):
    """Each video (N, F, H, W, 3) uint8 as PNG frames directory/<index>/<frame>.png, and as directory/<index>.mp4
    where imageio with its ffmpeg plugin is installed (not a dependency: the frames are always written)."""
    import logging
    import os

    try:
        import imageio.v2 as imageio
    except ImportError:
        imageio = None
    for i, video in enumerate(np.asarray(videos, dtype=np.uint8)):
        folder = os.path.join(directory, f"{i:05d}")
        os.makedirs(folder, exist_ok=True)
        for f, frame in enumerate(video):
            with atomic_path(os.path.join(folder, f"{f:03d}.png")) as tmp:
                Image.fromarray(frame).save(tmp, format="PNG")
        if imageio is not None:
            try:
                imageio.mimwrite(os.path.join(directory, f"{i:05d}.mp4"), list(video), fps=fps)
            except (ValueError, RuntimeError, OSError) as e:  # no ffmpeg backend
                logging.getLogger(__name__).info("no mp4 for video %d (%s); frames written", i, e)
                imageio = None
