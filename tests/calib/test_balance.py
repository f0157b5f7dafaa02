"""calib/balance.py's deal: an even share of a minibatch's rows for every process, with the fewest rows moved. (The
exchange of the rows between processes: tests/calib/test_data_parallel.py, two gloo processes.)"""
import itertools

import pytest
import torch

from vq4dit.calib.balance import deal


def fewest_moves(holders, size):
    """By brute force: the fewest rows that must change process for every process to compute B // size rows or one
    more (every choice of the processes taking one more)."""
    counts = torch.bincount(holders, minlength=size).tolist()
    base, extra = divmod(len(holders), size)
    return min(sum(max(0, c - base - (r in more)) for r, c in enumerate(counts))
               for more in itertools.combinations(range(size), extra))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_every_process_computes_an_even_share_moving_the_fewest_rows(size, rows):
    """Random holders, 20 minibatches per case: each process computes B // size or B // size + 1 rows; the rows
    that move are as few as any even deal allows (the brute force above); a process sends or receives, never both.
    Catches the larger shares given by rank rather than to the processes holding the most (more rows move), a
    process keeping more than its share, and a short process left short."""
    generator = torch.Generator().manual_seed(size * 100 + rows)
    for _ in range(20):
        holders = torch.randint(0, size, (rows,), generator=generator)
        computer = deal(holders, size)
        shares = torch.bincount(computer, minlength=size)
        assert shares.min() >= rows // size and shares.max() <= -(-rows // size)
        moved = computer != holders
        assert int(moved.sum()) == fewest_moves(holders, size)
        senders, receivers = set(holders[moved].tolist()), set(computer[moved].tolist())
        assert not senders & receivers
        assert torch.equal(deal(holders, size), computer)


def test_a_deal_keeps_each_holders_first_rows():
    """Process 0 holds the first 6 of 8 rows over 2 processes: it keeps its first 4 (minibatch order) and the 5th and
    6th go to process 1, which keeps its own. Catches rows kept from the end, or sent to the wrong process."""
    holders = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0])
    assert deal(holders, 2).tolist() == [0, 0, 1, 0, 0, 1, 1, 1]
