"""Replay recorded block calls: rebuild a block's arguments from a table of cached tensors and call it.

A table maps references (calib/tables.py) to (M, ...) tensors: slots (the recorded inputs, calib/capture.py) and
Out(block, k) (output k of a block, produced while walking the blocks). The full-precision chain and the quantized
chain each have their own table; slots are shared by both. Everything a block returns is matched: the error of a
block is the squared error summed over all its output tensors, divided by their total size (one tensor: plain MSE).
"""
from dataclasses import dataclass

import torch

from vq4dit.calib.calls import flatten, leaves, unflatten
from vq4dit.calib.capture import to_cache
from vq4dit.calib.chunks import replay_chunk
from vq4dit.calib.tables import Out, ref_of
from vq4dit.utils.distributed import mean_error


@dataclass
class Replay:
    """One recorded block call to replay over the calibration points: its wiring `call` (calib.record.BlockCall),
    the `table` its inputs come from, which slots are `batched` (one row per point), and the number of `rows`."""

    call: object
    table: dict
    batched: dict
    rows: int


def rows_to(t, rows, device):
    """t[rows] (rows: a slice or an index tensor) on `device`. From host memory to a GPU the rows are gathered into
    pinned memory and copied without blocking the host, so the host queues the update's kernels meanwhile (a copy
    from pageable memory waits for the device); the values are t[rows]'s either way."""
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t[rows].to(device)
    if isinstance(rows, slice):
        picked = t[rows]  # a view
        pinned = torch.empty(picked.shape, dtype=t.dtype, pin_memory=True).copy_(picked)
    else:
        pinned = torch.empty((len(rows), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        torch.index_select(t, 0, rows, out=pinned)
    return pinned.to(device, non_blocking=True)  # the pinned block is not reused before the copy is done


def gather(spec, table, batched, rows, device, dtype=torch.float32):
    """(args, kwargs) of a recorded block call at `rows` (slice or index tensor), on `device`, floats in `dtype`."""
    def leaf(node):
        ref = ref_of(node)
        t = table[ref]
        # block outputs always have one row per point
        t = rows_to(t, rows, device) if batched.get(ref, True) else t.to(device)
        return t.to(dtype) if t.is_floating_point() else t

    value = unflatten(spec, leaf)
    return value["args"], value["kwargs"]


def batched_reads(spec, table, batched):
    """{ref: (M, ...) tensor} of `table`'s batched tensors (one row per point) that the recorded call `spec` reads."""
    return {ref: table[ref] for ref in map(ref_of, leaves(spec)) if batched.get(ref, True)}


def call_block(block, replay, rows, device):
    """Run `block` on the replayed arguments at `rows` -> its output tensors (list)."""
    args, kwargs = gather(replay.call.inputs, replay.table, replay.batched, rows, device)
    return flatten(block(*args, **kwargs))[1]


def squared_error(outs, targets):
    """(sum of squared errors, element count) over lists of tensors."""
    total = sum((o.float() - t.to(o.device).float()).pow(2).sum() for o, t in zip(outs, targets))
    return total, sum(o.numel() for o in outs)


def block_loss(outs, targets):
    """The block output error over every output tensor: sum of squared errors / total size."""
    total, count = squared_error(outs, targets)
    return total / count


def rows_loss(forward, targets, device):
    """loss_fn(idx) of one process holding every point: block_loss of forward(idx) -> output tensors (a block on its
    replayed inputs, or the chain of blocks) against `targets` [(M, ...)] at the minibatch idx (B,)."""
    def loss_fn(idx):
        outs = forward(idx)
        return block_loss(outs, [rows_to(t, idx, device) for t in targets])

    return loss_fn


@torch.no_grad()
def sweep(block, replay, device, alloc=None, targets=None, chunk=None):
    """Run `block` over all rows in chunks of `chunk` rows (None: as many as the evaluation budget holds,
    calib/chunks.py) -> (outputs or None, error vs `targets` or None).

    alloc(first chunk's outputs, num_rows) -> list of (M, ...) tensors to write the outputs into (one may be an input
    of this block: a chunk's outputs depend only on that chunk's rows); None: outputs are not kept.
    targets: optional list of (M, ...) tensors to measure the block error against.
    """
    total, count, out, chunk = 0.0, 0, None, chunk or replay_chunk(replay)
    for s in range(0, replay.rows, chunk):
        rows = slice(s, min(s + chunk, replay.rows))
        outs = call_block(block, replay, rows, device)
        if targets is not None:
            err, n = squared_error(outs, [t[rows] for t in targets])
            total, count = total + err.item(), count + n
        if alloc is not None:
            out = alloc(outs, replay.rows) if out is None else out
            for dst, o in zip(out, outs):
                dst[rows] = to_cache(o, dst.dtype)
    return out, (mean_error(total, count) if targets is not None else None)  # over the processes' rows (torchrun)


def run_chain(blocks, cset, rows, device, grad=False):
    """Feed `blocks` by themselves from the calibration set's slots at `rows` (a minibatch): every block's outputs
    (list of lists). This is how a sampler runs the model: block i + 1 sees block i's outputs, wired as recorded."""
    table, cut = dict(cset.slots), dict(cset.batched)
    outputs = []
    with torch.set_grad_enabled(grad):
        for i, (block, call) in enumerate(zip(blocks, cset.calls)):
            args, kwargs = gather(call.inputs, table, cut, rows, device)
            outs = flatten(block(*args, **kwargs))[1]
            outputs.append(outs)
            for k, o in enumerate(outs):
                table[Out(i, k)], cut[Out(i, k)] = o, False  # already this minibatch's rows
    return outputs
