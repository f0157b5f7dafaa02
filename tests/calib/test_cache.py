import os

import torch

from calib.cache import ActivationStore


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
