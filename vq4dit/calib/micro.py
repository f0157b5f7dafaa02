"""Gradient accumulation (--micro-batch): an update's L_d in parts of at most micro_batch rows, each part's forward
made only when the previous part's backward is done (calib.train.Trainer.step takes the parts)."""
import contextlib

from vq4dit.calib.shared import SharedLoss
from vq4dit.utils.precision import update_autocast


def minibatch_loss(loss_fn, idx, config, device):
    """L_d of the minibatch idx (B,) as Trainer.step takes it: loss_fn(idx) in one pass, or, with config.micro_batch
    below B, micro_losses' parts; each forward under the update's autocast (config.step_dtype). Under torchrun
    (calib.shared.SharedLoss) the micro-batches are of this process's share of the rows."""
    if isinstance(loss_fn, SharedLoss):
        return loss_fn.parts(idx, config.micro_batch, lambda: update_autocast(config.step_dtype, device))
    if config.micro_batch is None or config.micro_batch >= len(idx):
        with update_autocast(config.step_dtype, device):
            return loss_fn(idx)
    return micro_losses(loss_fn, idx, config.micro_batch, lambda: update_autocast(config.step_dtype, device))


def micro_losses(loss_fn, idx, rows, autocast=contextlib.nullcontext):
    """L_d of the minibatch idx (B,) in parts, one per run of at most `rows` indices: loss_fn(part) * len(part) / B.

    loss_fn(part) must be a mean over the rows of `part` of per-row terms of one size (a block's output error: every
    row has the same element count), so the parts sum to loss_fn(idx) up to rounding. A generator: a part's forward
    runs only when the previous part's backward is done (Trainer.step), under a fresh `autocast()` context.
    """
    for s in range(0, len(idx), rows):
        part = idx[s:s + rows]
        with autocast():
            loss = loss_fn(part)
        yield loss * (len(part) / len(idx))
