"""An even share of every minibatch for each process under torchrun.

A minibatch is drawn over all processes' calibration points alike (the single process's draw), and each process
holds its own points, so the rows of a minibatch fall on the processes unevenly: 16 rows drawn at random over 8
processes put about 4.2 on the busiest on average, against the 2 of an even share, and every update waits for the
busiest (over 2 processes: 9.6 against 8). Here the rows are dealt evenly: a process holding more than its share
sends the recorded inputs and targets of the rest to processes holding fewer, which compute them. What is computed
is the single process's minibatch either way; only which process computes a row changes.
"""
import torch

from vq4dit.calib.replay import rows_to
from vq4dit.utils import distributed


def deal(holders, size):
    """(B,) the process that computes each row of a minibatch whose rows are held by `holders` (B,) of `size`
    processes: each computes B // size rows or one more, and keeps as many of its own as its share takes, so a row
    moves only from a process holding more than its share to one holding fewer (the fewest moves). The B % size
    larger shares go to the processes holding the most (ties: the lower rank). The same on every process."""
    counts = torch.bincount(holders, minlength=size).tolist()
    share = [len(holders) // size] * size
    for r in sorted(range(size), key=lambda r: (-counts[r], r))[:len(holders) % size]:
        share[r] += 1
    computer = holders.clone()
    # the rows beyond each holder's share, in minibatch order, fill the shares left short in rank order
    spare = [j for r in range(size) for j in (holders == r).nonzero().flatten()[share[r]:].tolist()]
    short = [r for r in range(size) for _ in range(share[r] - min(counts[r], share[r]))]
    computer[spare] = torch.tensor(short, dtype=computer.dtype)
    return computer


class RowExchange:
    """Deals each minibatch (`deal`) over the processes, one of which this is, holding the rows of RowShard `shard`
    (the others' shards are learnt here, with one collective, so every process builds it at the same point: each
    SharedLoss does, once per block and once for the end-to-end pass), and brings this process the rows it
    computes."""

    def __init__(self, shard, device):
        self.shard, self.device = shard, device
        self.rank, self.size = distributed.rank(), distributed.size()
        holders = torch.zeros(shard.total, dtype=torch.int64)
        holders[shard.rows] = self.rank + 1
        self.holders = distributed.all_sum_(holders) - 1  # (total,) the process holding each point

    def take(self, idx, tensors):
        """The rows this process computes of the global minibatch idx (B,): [(n, ...) on the device] of each of
        `tensors` [(M_local, ...)], its own rows first (in idx's order), then those received, by sender."""
        held = self.holders[idx]
        computer = deal(held, self.size)
        mine, others = held == self.rank, [r for r in range(self.size) if r != self.rank]
        sent = {dest: self.shard.local(idx[mine & (computer == dest)]) for dest in others}
        counts = {src: int(((held == src) & (computer == self.rank)).sum()) for src in others}
        incoming = {src: [((count, *t.shape[1:]), t.dtype) for t in tensors] for src, count in counts.items() if count}
        # the rows sent are gathered in the call: freed once sent, before this process's own rows are
        received = distributed.exchange({dest: [rows_to(t, rows, self.device) for t in tensors]
                                         for dest, rows in sent.items() if len(rows)}, incoming, self.device)
        own = self.shard.local(idx[mine & (computer == self.rank)])
        if not received:  # no copy of a copy
            return [rows_to(t, own, self.device) for t in tensors]
        return [torch.cat([rows_to(t, own, self.device), *(received[src][k] for src in sorted(received))])
                for k, t in enumerate(tensors)]
