"""Sampled images as files: a class-sorted, labelled grid PNG and the ADM evaluator's samples.npz.

samples.npz: arr_0 uint8 (N, H, W, 3) in sample-index order, arr_1 int64 labels (N,) (class ids, or prompt
indices for text-to-image models), and `labels` ("classes" or "prompts": what arr_1 holds; the ADM evaluator reads
arr_0 only).
"""
import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vq4dit.utils.errors import error_detail
from vq4dit.utils.fileio import atomic_paths, disk_full, temporary_name

logger = logging.getLogger(__name__)

NPZ_FILE, GRID_FILE, VIDEO_DIR = "samples.npz", "grid.png", "videos"
LABELS_KEY = "labels"  # samples.npz: what arr_1 holds, one of LABEL_KINDS
LABEL_KINDS = ("classes", "prompts")
SAMPLING_KEY = "sampling"  # samples.npz: JSON of the settings the images depend on (seed, steps, guidance, ...)
RUN_KEY = "run_key"  # in that JSON: the digest of sample.py's whole sampling key (the model's files included)
GRID_SAMPLES = 256  # make_grid's max_samples
ARCHIVE_OVERHEAD = 4096  # bytes: the zip and .npy headers of samples.npz
PNG_HEADERS = 128  # bytes: a PNG's signature, IHDR, IEND and the first IDAT's chunk header


def npz_bytes(num_samples, size):
    """Bytes of samples.npz for `num_samples` samples of `size`: (H, W) images or (F, H, W) videos (np.savez stores
    them uncompressed)."""
    return num_samples * (math.prod(size) * 3 + 8) + ARCHIVE_OVERHEAD


def grid_bytes(labels, size):
    """Bytes to expect for make_grid's PNG (its defaults) of images of `size` (H, W) with `labels`: the raw RGB of
    its exact geometry, or less where tiles are upscaled: PNG stores an upscaled tile about as its source pixels plus
    a few bytes per repeat, measured at 1.02x (no upscale) to 3x (16x) the source pixels for noise (PNG's worst
    case), estimated here at 1.5 + s/4 times them for upscale s; plus the headers."""
    layout = grid_layout(labels, size)
    (width, height), th = layout.shape, layout.tile[0]
    shown = sum(len(idx) for _, idx in layout.rows) * size[0] * size[1] * 3
    return min((width * 3 + 1) * height * 101 // 100, int(shown * (1.5 + th / size[0] / 4))) + ARCHIVE_OVERHEAD


def frame_png_bytes(size):
    """An upper bound on one video frame of `size` (H, W) as save_videos' PNG: its rows with a filter byte each,
    deflate's worst case (stored blocks, 1% more) and the PNG's chunk headers."""
    return (size[1] * 3 + 1) * size[0] * 101 // 100 + PNG_HEADERS


def sample_files_bytes(labels, size):
    """Bytes to expect for what save_all writes for samples with `labels` (N,) of `size`: (H, W) images, samples.npz
    (exactly) and grid.png; (F, H, W) videos, samples.npz holding every frame, the grid of first frames, and videos/
    with each frame as a PNG (the mp4s beside them, where imageio writes them, are compressed video: not counted)."""
    frames = len(labels) * size[0] * frame_png_bytes(size[1:]) if len(size) == 3 else 0
    return npz_bytes(len(labels), size) + grid_bytes(labels, size[-2:]) + frames


def save_samples(out_dir, images, labels, prompted=False, sampling=None):
    """out_dir/samples.npz and out_dir/grid.png, both or (on any error, e.g. a full disk) neither. Videos
    (N, F, H, W, 3): the npz holds them whole, the grid shows their first frames. `prompted`: the labels are prompt
    indices (a text-to-image model), not class ids; `sampling`: the settings the images depend on, recorded so that
    a paired comparison can check it compares like with like (evaluation.samples.check_pairing)."""
    images = np.asarray(images, dtype=np.uint8)
    stills = images[:, 0] if images.ndim == 5 else images
    paths = [os.path.join(out_dir, NPZ_FILE), os.path.join(out_dir, GRID_FILE)]
    needed = npz_bytes(len(labels), images.shape[1:-1]) + grid_bytes(labels, stills.shape[1:3])  # videos: all frames
    with atomic_paths(paths, needed=needed) as (npz_tmp, grid_tmp):
        with open(npz_tmp, "wb") as f:
            extra = {} if sampling is None else {SAMPLING_KEY: np.array(json.dumps(sampling, sort_keys=True))}
            np.savez(f, arr_0=images, arr_1=np.asarray(labels, dtype=np.int64),
                     **{LABELS_KEY: np.array(LABEL_KINDS[prompted])}, **extra)
        make_grid(stills, labels).save(grid_tmp, format="PNG")


@dataclass(frozen=True)
class GridStyle:
    """How make_grid lays samples out: at most `max_cols` tiles per row, tiles upscaled to at least `min_tile` px,
    `pad` px between them, the first `max_samples` samples, one row per class up to `max_class_rows` classes."""

    max_cols: int = 16
    min_tile: int = 64
    pad: int = 2
    max_samples: int = GRID_SAMPLES
    max_class_rows: int = 16


@dataclass(frozen=True)
class GridLayout:
    """rows [(label text, sample indices)], tile (height, width), the label margin and the grid's (width, height)."""

    rows: list
    tile: tuple
    margin: int
    shape: tuple


def grid_layout(labels, size, style=GridStyle()):
    """make_grid's GridLayout of images of `size` (H, W) with `labels` in GridStyle `style`."""
    labels = np.asarray(labels)[:style.max_samples]
    scale = max(1, -(-style.min_tile // size[0]))
    th, tw = size[0] * scale, size[1] * scale
    rows, cols = [], style.max_cols  # (row label, indices of that row)
    if len(np.unique(labels)) <= style.max_class_rows:
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)  # stable: sample-index order within a class
            rows += [(str(c), idx[s:s + cols]) for s in range(0, len(idx), cols)]
    else:
        idx = np.argsort(labels, kind="stable")
        rows = [("", idx[s:s + cols]) for s in range(0, len(idx), cols)]
    widest = max((len(r) for _, r in rows), default=1)
    font = ImageFont.load_default()
    margin = 8 + max((int(font.getlength(text)) for text, _ in rows), default=8)
    pad = style.pad
    return GridLayout(rows, (th, tw), margin, (margin + widest * (tw + pad) + pad, len(rows) * (th + pad) + pad))


def make_grid(images, labels, style=GridStyle()):
    """PIL grid of the first `style.max_samples` images (a 50k-sample ImageNet run must not build a gigapixel PNG).

    With at most `style.max_class_rows` classes among them: one row per class (wrapping after max_cols), classes
    ascending, each row labelled on the left. With more (ImageNet): the images sorted by class, max_cols per
    row, unlabelled. images: uint8 (N, H, W, 3); small images are upscaled (nearest) to at least `min_tile` px.
    """
    images = np.asarray(images)[:style.max_samples]
    layout, pad = grid_layout(labels, images.shape[1:3], style), style.pad
    (th, tw), margin = layout.tile, layout.margin
    font = ImageFont.load_default()
    grid = Image.new("RGB", layout.shape, (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (text, idx) in enumerate(layout.rows):
        y = pad + r * (th + pad)
        draw.text((4, y + th // 2 - 6), text, fill=(0, 0, 0), font=font)
        for j, i in enumerate(idx):
            tile = Image.fromarray(images[i]).resize((tw, th), Image.NEAREST)
            grid.paste(tile, (margin + pad + j * (tw + pad), y))
    return grid


def save_videos(directory, videos, fps=8):
    """Each video (N, F, H, W, 3) uint8 as PNG frames directory/<index>/<frame>.png, and as directory/<index>.mp4
    where imageio has an mp4 writer (its ffmpeg plugin: not a dependency; without one, one warning and the frames
    only). Written into a temporary directory renamed onto `directory` at the end (replacing an earlier run's), so
    that a failure (a full disk: one line naming the file) or an interrupt leaves nothing."""
    videos = np.asarray(videos, dtype=np.uint8)
    parent, name = os.path.split(os.path.abspath(directory))
    tmp = os.path.join(parent, temporary_name(name))
    try:
        os.makedirs(tmp)
        mp4 = True
        for i, video in enumerate(videos):
            folder = os.path.join(tmp, f"{i:05d}")
            os.mkdir(folder)
            for f, frame in enumerate(video):
                Image.fromarray(frame).save(os.path.join(folder, f"{f:03d}.png"), format="PNG")
            mp4 = mp4 and write_mp4(os.path.join(tmp, f"{i:05d}.mp4"), video, fps)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, [directory]) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise


def write_mp4(path, video, fps):
    """`video` (F, H, W, 3) as an mp4 at `path`; False (after one warning) when imageio has no mp4 writer."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        imageio = None
    try:
        if imageio is None:
            raise ImportError("imageio is not installed")
        imageio.mimwrite(path, list(video), fps=fps, format="FFMPEG")
        return True
    except (ImportError, ValueError, RuntimeError, TypeError, OSError) as e:
        if disk_full(e) is not None:
            raise
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        detail = error_detail(e)
        logger.warning("no mp4 writer (imageio with its ffmpeg plugin: pip install imageio[ffmpeg]): %s; the videos "
                       "are written as PNG frames only", detail)
        return False
