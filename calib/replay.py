"""Replay recorded block calls: rebuild a block's arguments from a table of cached tensors and call it.

A table maps keys to (M, ...) tensors: slot keys (the recorded inputs, calib/capture.py) and o<block>.<k> (output
k of a block, produced while walking the blocks). The full-precision chain and the quantized chain each have
their own table; slots are shared by both. Everything a block returns is matched: the error of a block is the
squared error summed over all its output tensors, divided by their total size (one tensor: plain MSE).
"""
import torch

from calib.calls import flatten, unflatten
from calib.capture import to_cache
from calib.record import out_key, ref_key


def gather(spec, table, batched, rows, device, dtype=torch.float32):
    """(args, kwargs) of a recorded block call at `rows` (slice or index tensor), on `device`, floats in `dtype`."""
    def leaf(node):
        key = ref_key(node)
        t = table[key]
        if batched.get(key, True):
            t = t[rows]
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() else t

    value = unflatten(spec, leaf)
    return value["args"], value["kwargs"]


def call_block(block, call, table, batched, rows, device):
    """Run `block` on the recorded arguments of `call` at `rows` -> its output tensors (list)."""
    args, kwargs = gather(call.inputs, table, batched, rows, device)
    return flatten(block(*args, **kwargs))[1]


def squared_error(outs, targets):
    """(sum of squared errors, element count) over lists of tensors."""
    total = sum((o.float() - t.to(o.device).float()).pow(2).sum() for o, t in zip(outs, targets))
    return total, sum(o.numel() for o in outs)


def block_loss(outs, targets):
    """The block output error over every output tensor: sum of squared errors / total size."""
    total, count = squared_error(outs, targets)
    return total / count


@torch.no_grad()
def sweep(block, call, table, batched, num_rows, device, alloc=None, targets=None, chunk=256):
    """Run `block` over all rows in chunks -> (outputs or None, error vs `targets` or None).

    alloc(first chunk's outputs, num_rows) -> list of (M, ...) tensors to write the outputs into (one may be an input
    of this block: a chunk's outputs depend only on that chunk's rows); None: outputs are not kept.
    targets: optional list of (M, ...) tensors to measure the block error against.
    """
    total, count, out = 0.0, 0, None
    for s in range(0, num_rows, chunk):
        rows = slice(s, min(s + chunk, num_rows))
        outs = call_block(block, call, table, batched, rows, device)
        if targets is not None:
            err, n = squared_error(outs, [t[rows] for t in targets])
            total, count = total + err.item(), count + n
        if alloc is not None:
            out = alloc(outs, num_rows) if out is None else out
            for dst, o in zip(out, outs):
                dst[rows] = to_cache(o, dst.dtype)
    return out, (total / count if targets is not None else None)


def run_chain(blocks, calls, slots, batched, rows, device, grad=False):
    """Feed `blocks` by themselves from the slots at `rows` (a minibatch): every block's outputs (list of lists).

    This is how a sampler runs the model: block i + 1 sees block i's outputs, wired as recorded.
    """
    table, cut = dict(slots), dict(batched)
    outputs = []
    with torch.set_grad_enabled(grad):
        for i, (block, call) in enumerate(zip(blocks, calls)):
            args, kwargs = gather(call.inputs, table, cut, rows, device)
            outs = flatten(block(*args, **kwargs))[1]
            outputs.append(outs)
            for k, o in enumerate(outs):
                table[out_key(i, k)], cut[out_key(i, k)] = o, False  # already this minibatch's rows
    return outputs
