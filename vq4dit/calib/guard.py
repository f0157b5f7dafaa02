"""Calibration never leaves a block worse than where it started (issue 20): a too small or too large budget can.

Before training, each layer's starting point (its argmax assignment: k-means nearest, or the output-aware fit) is
kept as a hard copy. After training, the block's error with the calibrated layers and with the starting ones is
compared on the first PROBE_ROWS calibration points; when the start is better, the block goes back to it and each
layer in turn takes its calibrated state again if that lowers the error (greedy, in block order), so the block
ends at most at its starting error there; a warning gives the numbers.
"""
import copy
import logging

import torch

from vq4dit.calib.replay import Replay, sweep
from vq4dit.utils import distributed

logger = logging.getLogger(__name__)

PROBE_ROWS = 256  # a sixth of the default's 1536 points: the guard costs a third of one forward sweep per block;
# its sweeps run in chunks the evaluation budget holds (calib/chunks.py)


def starting_point(layers):
    """{name: hard copy of each layer at its argmax assignment, codebook rounded as it would be stored}."""
    return {name: copy.deepcopy(layer).harden().round_codebook_() for name, layer in layers.items()}


def keep_better(block, layers, start, replay, targets, device):
    """Per layer, the better of calibrated and `start` (starting_point) for the block's error on the first
    PROBE_ROWS rows of `replay` against `targets`; returns the names of the layers sent back to their start."""
    probe = Replay(replay.call, replay.table, replay.batched, min(replay.rows, PROBE_ROWS))
    probe_targets = [t[:probe.rows] for t in targets]

    def error():
        return sweep(block, probe, device, targets=probe_targets)[1]

    calibrated = error()
    trained = {name: copy.deepcopy(layer.state_dict()) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.load_state_dict(start[name].state_dict())
    started = error()
    if calibrated <= started:
        for name, layer in layers.items():
            layer.load_state_dict(trained[name])
        return []
    # from the start, each layer in turn takes its calibrated state when that lowers the error: never above `started`
    best, reverted = started, []
    for name, layer in layers.items():
        layer.load_state_dict(trained[name])
        now = error()
        if now < best:
            best = now
        else:
            layer.load_state_dict(start[name].state_dict())
            reverted.append(name)
    warn_reverted((calibrated, started, best), probe.rows, reverted, len(layers))
    return reverted


def warn_reverted(errors, rows, reverted, count):
    """The guard's warning: `errors` (calibrated, started, now) on this process's `rows` probe points, `reverted` of
    `count` layers sent back. Under torchrun every process gets here (its errors are over all of theirs): the points
    summed, the warning said once, by rank 0 (a new user's trial: each rank said it, with its own count)."""
    points = int(distributed.all_sum_(torch.tensor([rows], dtype=torch.float64)).item())
    if distributed.rank() == 0:
        logger.warning("calibration left the block worse than its start (error %.4g vs %.4g on %d points): %d of %d "
                       "layers keep their starting point (%s), error now %.4g; a larger --iters or a smaller learning "
                       "rate may do better", errors[0], errors[1], points, len(reverted), count,
                       ", ".join(reverted) or "none", errors[2])
