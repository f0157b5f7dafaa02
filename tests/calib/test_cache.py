import errno
import os

import pytest
import torch

from vq4dit.calib.cache import ActivationStore
from vq4dit.utils.errors import UserError


def test_tensors_past_the_budget_live_in_files_that_release_deletes(tmp_path):
    store = ActivationStore(max_bytes=1000, cache_dir=str(tmp_path))
    small = store.empty((10, 10), torch.float32)  # 400 B: in memory
    big = store.empty((20, 10), torch.float16)  # 400 B more: 800 <= 1000, in memory
    spilled = store.empty((30, 10), torch.float16)  # 600 B more: past the budget, a file
    assert store.in_memory == 800 and len(os.listdir(tmp_path)) == 1
    spilled[:] = torch.arange(300, dtype=torch.float16).reshape(30, 10)
    path = tmp_path / os.listdir(tmp_path)[0]
    assert os.path.getsize(path) == 600
    assert torch.equal(torch.from_file(str(path), size=300, dtype=torch.float16).reshape(30, 10), spilled)
    store.release(spilled)
    assert os.listdir(tmp_path) == []
    store.release(small)
    assert store.in_memory == 400 and store.peak == 800
    store.release(big)


def test_no_budget_keeps_everything_in_memory(tmp_path):
    store = ActivationStore(max_bytes=None, cache_dir=str(tmp_path))
    store.empty((1000, 1000), torch.float16)
    assert os.listdir(tmp_path) == [] and store.in_memory == 2_000_000


def test_a_spilled_tensor_reserves_its_disk_space_when_created(tmp_path):
    """Before any write the file's blocks are allocated (mutation: a sparse file from torch.from_file alone, which a
    full disk turns into SIGBUS on the first write of an unbacked page)."""
    store = ActivationStore(max_bytes=0, cache_dir=str(tmp_path))
    store.empty((64, 1024), torch.float32)  # 256 KiB
    (path,) = tmp_path.iterdir()
    assert path.stat().st_size == 64 * 1024 * 4
    assert path.stat().st_blocks * 512 >= 64 * 1024 * 4
    store.close()


def test_a_full_disk_is_one_line_naming_the_file_and_bytes_and_leaves_no_file(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    store = ActivationStore(max_bytes=0, cache_dir=str(tmp_path))
    with pytest.raises(UserError) as info:
        store.empty((30, 10), torch.float16)
    message = str(info.value)
    assert "\n" not in message and f"act-{os.getpid()}-0.bin" in message and "needed 600 bytes" in message
    assert str(tmp_path) in message
    assert os.listdir(tmp_path) == []  # mutation: keeping the partial file


def test_closing_removes_the_cache_directory_it_made_and_keeps_one_from_before(tmp_path):
    """--max-cache-gb 0 left an empty calib_cache/ in the finished artifact, and --cache-dir NEW an empty NEW: the
    store removes a directory it created once its files are gone, never one that was there (mutations: no removal;
    removing any empty directory)."""
    for made, existed in ((tmp_path / "new" / "cache", False), (tmp_path / "kept", True)):
        if existed:
            made.mkdir()
        with ActivationStore(max_bytes=0, cache_dir=str(made)) as store:
            store.empty((4, 4), torch.float32)
            assert len(os.listdir(made)) == 1
        assert made.exists() == existed
