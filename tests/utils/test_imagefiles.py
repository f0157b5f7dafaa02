"""grid.png (class rows, bounded size) and samples.npz (atomic) writing."""
import errno
import os

import numpy as np
import pytest
from PIL import Image

from vq4dit.jobs.sample import check_memory
from vq4dit.utils.errors import UserError
from vq4dit.utils.imagefiles import GridStyle, make_grid, sample_files_bytes, save_samples, save_videos


def colour_tiles(n):
    """n solid 4x4 tiles with distinct colours (green 200 keeps them apart from the white page and black text)."""
    images = np.zeros((n, 4, 4, 3), np.uint8)
    for i in range(n):
        images[i] = (10 + 9 * i, 200, 60)
    return images


def tile_boxes(grid, images):
    """(top, left) of each image's tile in the grid, found by its colour."""
    arr = np.asarray(grid)
    boxes = []
    for img in images:
        ys, xs = np.nonzero((arr == img[0, 0]).all(axis=2))
        assert len(ys), "tile missing from the grid"
        boxes.append((ys.min(), xs.min()))
    return boxes


@pytest.mark.parametrize("labels,max_cols", [([3, 1, 3, 0, 1, 3], 16), ([2, 2, 0, 2, 2, 2, 0], 2)])
def test_grid_rows_are_classes_in_order(labels, max_cols):
    images = colour_tiles(len(labels))
    grid = make_grid(images, labels, GridStyle(max_cols=max_cols, min_tile=8))
    boxes = tile_boxes(grid, images)
    # expected layout: classes ascending, sample-index order within a class, wrapping after max_cols
    expected_rows = []
    for c in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        expected_rows += [idx[s:s + max_cols] for s in range(0, len(idx), max_cols)]
    tops = sorted({top for top, _ in boxes})
    assert len(tops) == len(expected_rows)
    for r, row in enumerate(expected_rows):
        assert [boxes[i][0] for i in row] == [tops[r]] * len(row)
        lefts = [boxes[i][1] for i in row]
        assert lefts == sorted(lefts) and len(set(lefts)) == len(lefts)
    # tiles are upscaled (nearest) to at least min_tile pixels
    arr = np.asarray(grid)
    top, left = boxes[0]
    assert (arr[top:top + 8, left:left + 8] == images[0, 0, 0]).all()


def test_grid_is_bounded_and_many_classes_pack_into_rows():
    labels = [5, 3, 4, 1, 0, 2, 9, 8, 7, 6]
    images = colour_tiles(len(labels))
    grid = make_grid(images, labels, GridStyle(max_cols=3, min_tile=4, pad=0, max_samples=7, max_class_rows=4))
    arr = np.asarray(grid)
    for i in range(7, 10):  # beyond max_samples: not drawn
        assert not (arr == images[i, 0, 0]).all(axis=2).any()
    boxes = tile_boxes(grid, images[:7])
    order = sorted(range(7), key=lambda i: labels[i])  # by class, max_cols per row
    for pos, i in enumerate(order):
        assert boxes[i][0] == 4 * (pos // 3)
    assert arr.shape[0] == 4 * 3  # ceil(7 / 3) rows of 4-pixel tiles


def test_save_samples_writes_both_files_or_keeps_the_old_pair(tmp_path):
    save_samples(tmp_path, np.zeros((2, 4, 4, 3)), [1, 2])
    before = {name: (tmp_path / name).read_bytes() for name in ("samples.npz", "grid.png")}
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 4, 4, 3) and npz["arr_1"].tolist() == [1, 2]
    with pytest.raises(ValueError):
        save_samples(tmp_path, np.ones((2, 4, 4, 3)), ["not", "labels"])  # fails inside the npz write
    # the failed write left the old pair untouched, and no temporary file
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "samples.npz"]


def test_a_full_disk_while_writing_the_grid_leaves_neither_file(tmp_path, monkeypatch):
    """The npz is written first: a disk that fills while the grid is encoded must not leave it behind (mutation:
    renaming each file as soon as it is written)."""
    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "out"
    images = np.zeros((3, 4, 4, 3), np.uint8)
    with pytest.raises(UserError) as info:
        save_samples(out, images, [0, 1, 2])
    message = str(info.value)
    assert str(out / "samples.npz") in message and str(out / "grid.png") in message
    assert f"needed {sample_files_bytes([0, 1, 2], (4, 4)):,} bytes" in message and "\n" not in message
    assert os.listdir(out) == []


def test_the_space_estimate_bounds_the_files_written_and_is_honest(tmp_path):
    """sample_files_bytes is an upper bound (it feeds the free-space check), for noise (PNG's worst case) and for 16
    classes with one long row (the grid's widest layout), from no upscale to 16x, and within 2x of what noise writes
    (mutation: counting only samples.npz -> below; the raw grid with room for 256 more tiles, as before issue 29 ->
    a 250 KB run refused for want of 6.6 MB)."""
    rng = np.random.default_rng(0)
    for size, labels in ((16, rng.integers(0, 10, 40)), (16, [0] * 16 + list(range(1, 16))), (16, np.arange(20) % 10),
                         (4, np.arange(40) % 10), (8, np.zeros(300, int)), (64, np.arange(5)), (96, [1, 1])):
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        out = tmp_path / f"{size}-{len(labels)}"
        save_samples(out, images, labels)
        written = sum(p.stat().st_size for p in out.iterdir())
        assert written <= sample_files_bytes(labels, (size, size)) <= 2 * written, (size, len(labels))


@pytest.mark.parametrize("frames,size,count", [(5, 16, 3), (9, 8, 20), (2, 64, 2)])
def test_the_space_estimate_of_videos_bounds_their_files(tmp_path, frames, size, count):
    """sample_files_bytes of (F, H, W) counts what a video run writes: samples.npz with every frame, the grid of
    first frames and a PNG per frame in videos/ (mp4s, where imageio writes them, are not counted), within 2x
    (mutations: the npz sized from (F, H) as if F were the height, as before -> below; the frames' PNGs left out ->
    below)."""
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (count, frames, size, size, 3), dtype=np.uint8)
    labels = np.arange(count) % 2
    save_videos(tmp_path / "videos", videos)
    save_samples(tmp_path, videos, labels)
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".mp4")
    assert written <= sample_files_bytes(labels, (frames, size, size)) <= 2 * written


def test_a_video_count_that_cannot_fit_in_memory_is_refused_with_its_frames():
    """check_memory counts every frame of a video (mutation: the size read as (H, W), so 16 frames of 512x512 were
    16 x 512 pixels and any count passed)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    count = total // (16 * 512 * 512 * 3) + 1
    with pytest.raises(UserError, match=f"--num-samples {count}: {count:,} videos of 16 frames of 512x512 need"):
        check_memory(count, (16, 512, 512))
    check_memory(count // 4, (16, 512, 512))
