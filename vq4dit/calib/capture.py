"""The calibration set: block-call wiring plus the slot tensors of every recorded model call, one row per point.

`capture(model, blocks, schedule, store)` runs the teacher with a BlockRecorder and writes each recorded call's
slots into cache tensors of the ActivationStore (rows in recording order: trajectory batch, step, batch row).
Floating tensors with three or more dimensions (token activations) are cached in the store's `token_dtype`
(fp16 by default: (M, T, D) halves), everything else as it came (small conditioning vectors in fp32).
"""
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from vq4dit.calib.record import BlockCall, run_teacher
from vq4dit.utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Which teacher calls are recorded: `runs` [(trajectories, run())] sample with the teacher, `keep(call)` says
    whether the call-th model call of a trajectory batch is recorded, and the kept calls add up to `rows` rows."""

    runs: object
    keep: object
    rows: int
    trajectories: int | None = None  # for the progress bar


@dataclass
class CalibrationSet:
    calls: list  # [BlockCall] per block
    slots: dict  # key -> (M, ...) cached tensor, or a constant tensor shared by all points
    batched: dict  # key -> bool
    rows: int  # M
    shard: object = None  # utils.distributed.RowShard: the points of one of several processes (None: all points)

    def wiring_json(self):
        return {"calls": [c.to_json() for c in self.calls], "batched": self.batched, "rows": self.rows}

    @classmethod
    def from_json(cls, meta, slots):
        calls = [BlockCall(c["name"], c["inputs"], c["outputs"]) for c in meta["calls"]]
        return cls(calls, slots, dict(meta["batched"]), int(meta["rows"]))


def storage_dtype(t, cache_dtype):
    if t.is_floating_point():
        return cache_dtype if t.dim() >= 3 else torch.float32
    return t.dtype


def to_cache(h, dtype):
    """Activations h -> CPU `dtype`; a value beyond dtype's range (fp16: 65504) must stop the run here rather than
    turn into inf and a NaN calibration loss later."""
    out = h.to("cpu", dtype)
    if out.is_floating_point() and not torch.isfinite(out).all():
        raise FloatingPointError(f"activations exceed the {dtype} range of the calibration cache "
                                 f"(max |x| = {h.abs().max().item():.4g}); use a wider cache dtype "
                                 "(--cache-dtype bf16 or fp32)")
    return out


class _Writer:
    """on_call handler: checks each call's wiring against the first and writes its slots at the next rows."""

    def __init__(self, store, total_rows, cache_dtype):
        self.store, self.total_rows, self.cache_dtype = store, total_rows, cache_dtype
        self.calls, self.slots, self.batched, self.row = None, {}, {}, 0

    def __call__(self, live):
        wiring = [c.to_json() for c in live.calls]
        if self.calls is None:
            self.calls = live.calls
            self.first = json.dumps(wiring, sort_keys=True)
            for key, t in live.slots.items():
                self.batched[key] = live.batched[key]
                if self.batched[key]:
                    self.slots[key] = self.store.empty((self.total_rows, *t.shape[1:]),
                                                       storage_dtype(t, self.cache_dtype))
                else:
                    self.slots[key] = t.detach().to("cpu").clone()
        elif json.dumps(wiring, sort_keys=True) != self.first:
            raise UserError("the blocks were called differently at another sampler step (other arguments or "
                            "wiring); calibration needs the same block calls at every step")
        if self.row + live.rows > self.total_rows:
            raise RuntimeError(f"more calibration rows than planned ({self.total_rows})")
        for key, t in live.slots.items():
            if self.batched[key]:
                self.slots[key][self.row:self.row + live.rows] = to_cache(t, self.slots[key].dtype)
            elif not torch.equal(t.detach().to("cpu"), self.slots[key]):
                raise UserError(f"{live.calls[0].name}: input {key} has no batch dimension but changes between "
                                "sampler steps; cannot cache it for calibration")
        self.row += live.rows


def capture(model, blocks, schedule, store, progress=True):
    """Record the calibration set of `model`'s `blocks` [(name, module)] along the teacher calls of `schedule`."""
    writer = _Writer(store, schedule.rows, store.token_dtype)
    run_teacher(model, blocks, schedule.runs, schedule.keep, writer, schedule.trajectories, progress)
    if writer.calls is None:
        raise UserError("no model call was recorded; check calib_timesteps and steps")
    if writer.row != schedule.rows:
        raise RuntimeError(f"recorded {writer.row} calibration rows, planned {schedule.rows}")
    logger.info("recorded %d calibration points: %s", schedule.rows,
                ", ".join(f"{k} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                          for k, t in writer.slots.items()))
    return CalibrationSet(writer.calls, writer.slots, writer.batched, schedule.rows)


def call_on(call, device):
    """A recorded model call (args, kwargs) (capture_model_inputs) with its tensors moved to `device`."""
    args, kwargs = call
    return ([a.to(device) if torch.is_tensor(a) else a for a in args],
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()})


def capture_model_inputs(model, runs, keep, progress=True):
    """The model's own inputs [(args, kwargs)] (CPU) at the kept sampler steps: held-out points for metrics."""
    calls = []

    def on_call(live):
        def cpu(v):
            return v.detach().to("cpu").clone() if torch.is_tensor(v) else v

        calls.append(([cpu(a) for a in live.model_args], {k: cpu(v) for k, v in live.model_kwargs.items()}))

    run_teacher(model, [], runs, keep, on_call, progress=progress)
    return calls


def calib_steps(steps, count):
    """Sampler step indices i (steps-1 is the noisiest, 0 the last) kept per trajectory: `count` evenly spaced.

    The spacing (steps-1)/(count-1) is >= 1, so the rounded indices are distinct.
    """
    if not 1 <= count <= steps:
        raise ValueError(f"count must be in 1..{steps}, got {count}")
    return sorted({int(i) for i in np.round(np.linspace(0, steps - 1, count))}, reverse=True)


def step_filter(steps, count):
    """keep(call) for a BlockRecorder: the call-th model call of a trajectory is sampler step steps - 1 - call."""
    kept = set(calib_steps(steps, count))
    return lambda call: steps - 1 - call in kept
