import numpy as np
import pytest

from vq4dit.utils import distributed


@pytest.mark.parametrize("n,size,block", [(10, 3, 1), (10, 3, 4), (7, 2, 3), (5, 4, 2), (1, 3, 8)])
def test_shards_partition_positions_in_whole_batches(n, size, block):
    parts = [distributed.shard(n, r, size, block) for r in range(size)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    single_batches = [list(range(s, min(s + block, n))) for s in range(0, n, block)]
    for part in parts:  # each rank's consecutive batches are batches of the single-process run
        assert all(part[s:s + block].tolist() in single_batches for s in range(0, len(part), block))


def test_gather_is_identity_in_one_process():
    rows = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert distributed.gather_rows(rows, 3, "cpu", block=2) is rows
