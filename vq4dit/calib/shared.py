"""What the processes of a torchrun calibration compute together, each on the calibration points it holds
(utils.distributed.RowShard): a block's training loss and the input moments of its Linears.

The loss: each process's share of a global minibatch's L_d (calib.train.Trainer sums them and the gradients), the
minibatch's rows dealt evenly over the processes (calib/balance.py).
The moments: an output-aware fit (vq/weighted_kmeans.py gptvq) turns a difference of one float32 rounding in
E[x x^T] into other codewords, so the moments must be the single process's to the bit. One process sums x^T x
over chunks of its rows in order; here each chunk's inputs are gathered, in the single process's row order, on the
process that fits the layer (utils.distributed.owners by weight size, as jobs/methods.fit_layers_ assigns the
fits), which sums the very same products in the same order. A row's activations do not depend on the other rows
of its batch, so the chunk is the single process's chunk.
"""
import contextlib

import torch

from vq4dit.calib.balance import RowExchange
from vq4dit.calib.chunks import replay_chunk
from vq4dit.calib.replay import Replay, batched_reads, call_block, squared_error
from vq4dit.utils import distributed
from vq4dit.vq.weighted_kmeans import InputMoments


class SharedLoss:
    """L_d of a global minibatch on one of several processes, as calib.train.Trainer takes it (through
    calib.micro.minibatch_loss): this process's share of the minibatch's rows (calib.balance: dealt evenly, the rows
    it does not hold received from those that do), their squared errors over the element count of all B rows, in
    micro-batches of at most `micro_batch` rows of its share. Summed over the processes (the Trainer sums them and
    the gradients): the single process's L_d.

    forward(batch, rows) -> output tensors: the block (or chain) on `batch` {key: (n, ...)}, the batched inputs it
    reads at this process's share of the rows, at `rows` (a slice of them). sources {key: (M_local, ...)}: those
    inputs at the rows this process holds (RowShard `shard`); targets [(M_local, ...)]: the outputs to match there."""

    def __init__(self, forward, sources, targets, shard, device):
        self.forward, self.sources, self.targets, self.device = forward, sources, targets, device
        self.exchange = RowExchange(shard, device)
        self.per_row = sum(t.shape[1:].numel() for t in targets)

    def parts(self, idx, micro_batch=None, autocast=contextlib.nullcontext):
        """L_d's parts on this process (0-d tensors, summing to its share), one per micro-batch of its rows; a part's
        forward runs under a fresh autocast() when the generator reaches it (Trainer.step: after the previous part's
        backward). A process computing none of the rows (B below the process count) yields a 0-d zero."""
        taken = self.exchange.take(idx, [*self.sources.values(), *self.targets])
        batch, targets = dict(zip(self.sources, taken)), taken[len(self.sources):]
        n = len(targets[0])
        if not n:
            yield torch.zeros((), device=self.device)
        step = micro_batch or max(n, 1)
        for s in range(0, n, step):
            rows = slice(s, s + step)
            with autocast():
                total, _ = squared_error(self.forward(batch, rows), [t[rows] for t in targets])
            yield total / (len(idx) * self.per_row)


def shared_block_loss(block, replay, targets, shard, device):
    """The SharedLoss of `block` on its replayed inputs `replay` (Replay of the rows RowShard `shard` holds) against
    `targets` [(M_local, ...)]."""
    def forward(batch, rows):
        return call_block(block, Replay(replay.call, {**replay.table, **batch}, replay.batched, None), rows, device)

    return SharedLoss(forward, batched_reads(replay.call.inputs, replay.table, replay.batched), targets, shard,
                      device)


# an output-aware fit of an (out, in) Linear costs about in * out * (1 + in / FIT_IN_SCALE): the k-means terms grow
# with the weights, GPTQ's error feedback with in^2 * out (one thread, gptvq at k256 d4 on DiT-S/2's shapes: 5.6-7.6 s
# per million weights at in 384, 9.1 s at in 1536); the fitting process's input moments grow with in^2 too
FIT_IN_SCALE = 2500


def fit_cost(module):
    """The relative cost of fitting Linear `module` (anything with in_features and out_features) to its inputs."""
    return module.in_features * module.out_features * (1 + module.in_features / FIT_IN_SCALE)


def layer_owners(modules):
    """The rank that fits each of the Linears `modules` (anything with in_features and out_features)."""
    return distributed.owners([fit_cost(m) for m in modules], distributed.size())


@torch.no_grad()
def shared_input_moments(block, prefix, names, replay, shard, device):
    """calib.moments.block_input_moments under torchrun: {qualified name: (in, in) float64 E[x x^T]} of the Linears
    `names` of the FP `block` that this process fits (layer_owners), over every process's rows, summed as one
    process sums them: in the single process's sweep chunks (replay_chunk: a row's bytes, not the row count, set
    them, so every process computes the same chunk)."""
    modules = [block.get_submodule(name[len(prefix) + 1:]) for name in names]
    owner, chunk = layer_owners(modules), replay_chunk(replay)
    me = distributed.rank()
    accs = {name: InputMoments(m.in_features, None, full=True, device=device)
            for name, m, r in zip(names, modules, owner) if r == me}
    seen, handles = {}, []
    for name, m in zip(names, modules):
        handles.append(m.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0])))
    try:
        for s in range(0, shard.total, chunk):
            lo, hi = shard.below(s), shard.below(s + chunk)  # this process's rows of the chunk: a run of its rows
            if hi > lo:
                call_block(block, replay, slice(lo, hi), device)
            rows = shard.rows[lo:hi].to(device)
            for name, m, r in zip(names, modules, owner):
                x = seen.pop(name, torch.zeros((0, m.in_features), device=device))  # (b, ..., in)
                pieces = distributed.gather_rows_to(x.reshape(hi - lo, -1).float(), r)  # [(b_r, T * in)]
                where = distributed.gather_rows_to(rows, r)  # [(b_r, 1)]
                if r == me:
                    order = torch.cat(where)[:, 0].argsort()
                    accs[name].add(torch.cat(pieces)[order].reshape(-1, m.in_features))
    finally:
        for h in handles:
            h.remove()
    return {name: acc.full() for name, acc in accs.items()}
