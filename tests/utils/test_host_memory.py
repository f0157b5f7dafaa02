"""utils/host_memory.py: which tensors are a file's mapped pages, and the process's private / shared split."""
import mmap
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from vq4dit.utils.host_memory import mapped_bytes, memory_split

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_tensor_loaded_as_stored_is_mapped_and_a_converted_or_computed_one_is_not(tmp_path):
    """Catches a check that counts every CPU tensor (or none), a storage counted once per view, and a storage that
    only begins inside a mapping counted as mapped."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(300, 70).to(torch.bfloat16), "b": torch.randn(1000)}, str(path))
    loaded = load_file(str(path))
    a, b = loaded["a"], loaded["b"]
    assert mapped_bytes([a]) == a.untyped_storage().nbytes() >= a.nbytes
    assert mapped_bytes([a, a[1:], a.view(-1)]) == mapped_bytes([a])  # one storage, counted once
    assert mapped_bytes([a, b]) == mapped_bytes([a]) + mapped_bytes([b]) and mapped_bytes([b]) >= b.nbytes
    assert mapped_bytes([a.float(), a.clone(), torch.randn(300, 70)]) == 0
    big = torch.empty(1 << 20, dtype=torch.uint8)
    assert mapped_bytes([big]) == 0


def test_the_split_adds_up_and_counts_a_private_allocation():
    """Catches fields read in the wrong unit (kB) or private and shared swapped. The 64 MiB are a fresh anonymous
    mapping, written: a torch tensor may reuse pages the allocator kept resident from an earlier test in the same
    worker, and then no page is new (CI, 2026-12-05: private unchanged to the byte)."""
    before = memory_split()
    block = mmap.mmap(-1, 64 << 20)
    block.write(b"\1" * (64 << 20))  # every page touched: private to this process
    after = memory_split()
    assert set(after) == {"rss", "private", "shared", "pss"}
    assert after["rss"] == after["private"] + after["shared"]
    assert after["private"] - before["private"] > 60 << 20 and after["pss"] >= after["private"]
    block.close()
