"""The end-to-end pass after the block-wise walk (issue 19, lever d; AQLM's global fine-tuning).

The walk fits each block to its own FP targets, and what is left of each block's error adds up along the chain.
Once every layer is hard, the codebooks and biases of all layers (assignments fixed) train together for
`e2e_iters` updates so that the quantized blocks, fed by themselves from the recorded inputs as a sampler runs
them, end where the FP teacher's chain ends: the loss is the error of the last block's outputs, the input of the
model's FP head. Data: E2E_ROWS calibration points evenly spaced over the set (every trajectory batch and kept
step), copied before the walk frees the recorded inputs, and the FP chain's last-block outputs at those points,
copied when the walk computes them. The pass ends in the best state it measured there, the walk's included.
Under torchrun the points are the single process's; each process holds those among its calibration points, and the
processes compute the chain's loss, gradients and errors together (as calib/shared.py does for a block).
"""
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from vq4dit.calib.capture import CalibrationSet
from vq4dit.calib.checkpoints import Checkpoint
from vq4dit.calib.chunks import chain_chunk
from vq4dit.calib.replay import rows_loss, run_chain, squared_error
from vq4dit.calib.shared import SharedLoss
from vq4dit.calib.train import Minibatches, seeded_generator, train
from vq4dit.utils import distributed

logger = logging.getLogger(__name__)

E2E_ROWS = 256  # points of the pass: DiT-XL/2 block-0 inputs and last-block outputs there take 0.3 GiB in fp16
E2E_CHECK = 50  # updates between two measurements of the chain's end error (each costs about 5 updates)
E2E_CHUNK = 64  # most points of one chunk of the pass's error measurement
E2E_STREAM = 3  # random stream (seed, E2E_STREAM) of the pass's minibatch order
PREFIX = "e2e/"  # the pass's tensors among a saved state's activations


def spaced_rows(total, count=E2E_ROWS):
    """The pass's points among `total` calibration points: (R,) `count` positions evenly spaced (all when fewer)."""
    n = min(count, total)
    return torch.arange(n) * total // n


@dataclass
class EndPoints:
    """The pass's data: `rows` (R,) the chosen calibration points (positions in this process's calibration set),
    `slots` {key: (R, ...) tensor, or a constant shared by all points} the recorded inputs there, `targets`
    [(R, ...)] the FP chain's last-block outputs there (empty until the walk reaches the last block), and under
    torchrun `shard`, the utils.distributed.RowShard saying which of the pass's points these are (None: all)."""

    rows: torch.Tensor
    slots: dict
    batched: dict
    targets: list
    shard: distributed.RowShard | None = None

    @classmethod
    def take(cls, cset, count=E2E_ROWS):
        """`count` points of the calibration set `cset` evenly spaced over its rows (all of them when it has fewer);
        under torchrun (cset.shard) over every process's rows, this process keeping those it holds."""
        rows, shard = spaced_rows(cset.rows if cset.shard is None else cset.shard.total, count), None  # (R,)
        if cset.shard is not None:
            held = cset.shard.held(rows)
            rows, shard = cset.shard.local(rows), distributed.RowShard(torch.arange(len(rows))[held], len(rows))
        # constants copied too: a checkpoint saves these beside the walk's slots, and safetensors refuses a tensor
        # saved twice
        slots = {k: t[rows].clone() if cset.batched[k] else t.clone() for k, t in cset.slots.items()}
        return cls(rows, slots, dict(cset.batched), [], shard)

    def set_targets(self, targets):
        """The FP chain's last-block outputs [(M, ...)] over every point -> kept at the pass's rows."""
        self.targets = [t[self.rows].clone() for t in targets]

    def to_tensors(self):
        """{name: tensor} to save beside the walk's tables (names under PREFIX)."""
        out = {f"{PREFIX}rows": self.rows}
        if self.shard is not None:
            out.update({f"{PREFIX}held": self.shard.rows, f"{PREFIX}of": torch.tensor(self.shard.total)})
        out.update({f"{PREFIX}slot/{k}": t for k, t in self.slots.items()})
        out.update({f"{PREFIX}target/{k}": t for k, t in enumerate(self.targets)})
        return out

    @classmethod
    def from_tensors(cls, tensors, batched):
        """The inverse of to_tensors; None when `tensors` hold no pass data."""
        if f"{PREFIX}rows" not in tensors:
            return None
        slots, targets = {}, {}
        for name, t in tensors.items():
            kind, _, key = name.removeprefix(PREFIX).partition("/")
            if name.startswith(PREFIX) and kind == "slot":
                slots[key] = t
            elif name.startswith(PREFIX) and kind == "target":
                targets[int(key)] = t
        shard = None
        if f"{PREFIX}held" in tensors:
            shard = distributed.RowShard(tensors[f"{PREFIX}held"], int(tensors[f"{PREFIX}of"]))
        return cls(tensors[f"{PREFIX}rows"], slots, dict(batched), [targets[k] for k in sorted(targets)], shard)

    def calibration_set(self, calls):
        return CalibrationSet(calls, self.slots, self.batched, len(self.rows))


def end_pass_stage(problem, data, config, checkpoints, log, stats):
    """The stage after the walk: the pass over data.walk.points, then the final checkpoint and the pass's log line."""
    record = end_pass(problem, data.cset.calls, data.walk.points, config)
    checkpoints.save(Checkpoint.final(stats, problem.layers))
    log.append("e2e", [record])


def points_tensors(points):
    """EndPoints.to_tensors of `points`, or {} when the run has no pass (None)."""
    return {} if points is None else points.to_tensors()


@torch.no_grad()
def end_error(blocks, cset, targets, device):
    """The last block's output error of `blocks` fed by themselves from `cset`'s slots, vs `targets`; in chunks of
    at most E2E_CHUNK rows, fewer when the evaluation budget holds fewer (calib/chunks.py). Under torchrun over
    every process's points (the same number on every process)."""
    total, count = 0.0, 0
    chunk = chain_chunk(cset, copies=1, most=E2E_CHUNK) if cset.rows else 1
    for s in range(0, cset.rows, chunk):
        rows = slice(s, min(s + chunk, cset.rows))
        err, n = squared_error(run_chain(blocks, cset, rows, device)[-1], [t[rows] for t in targets])
        total, count = total + err.item(), count + n
    return distributed.mean_error(total, count)


def end_pass(problem, calls, points, config):
    """Train the codebooks and biases of every (hard) layer of `problem` for config.e2e_iters updates (learning rate
    config.e2e_lr) on the last-block error of the chain over `points` (EndPoints; `calls` the recorded wiring). The
    error there is measured every E2E_CHECK updates and at the end, and the layers end in the best state measured,
    the walk's included (a constant learning rate can overshoot late in the pass); codebooks are rounded to their
    storage precision afterwards. Returns the pass's stats: errors before and after, the measurements, whether
    the pass was kept."""
    start = time.perf_counter()
    blocks, device = [m for _, m in problem.blocks], problem.device
    cset, modules = points.calibration_set(calls), list(problem.layers.values())

    def measure(updates):
        error = end_error(blocks, cset, points.targets, device)
        errors.append([updates, error])
        if error < best["error"]:
            best.update(error=error, updates=updates, layers={n: copy.deepcopy(layer.state_dict())
                                                               for n, layer in problem.layers.items()})

    errors, best = [], {"error": float("inf")}
    measure(0)
    walked = best["layers"]

    def check(snapshot):
        if snapshot["iteration"] % E2E_CHECK == 0 and snapshot["iteration"] < config.e2e_iters:
            measure(snapshot["iteration"])

    shard = points.shard
    if shard is None:  # the chain's end error on a minibatch
        loss_fn = rows_loss(lambda idx: run_chain(blocks, cset, idx, device, grad=True)[-1], points.targets, device)
    else:
        def forward(batch, rows):  # the chain on this process's share of a minibatch (SharedLoss)
            share = CalibrationSet(cset.calls, {**cset.slots, **batch}, cset.batched, None)
            return run_chain(blocks, share, rows, device, grad=True)[-1]

        sources = {key: t for key, t in cset.slots.items() if cset.batched[key]}
        loss_fn = SharedLoss(forward, sources, points.targets, shard, device)
    batches = Minibatches(cset.rows if shard is None else shard.total, config.batch_size,
                          seeded_generator(problem.seed, E2E_STREAM))
    settings = dataclasses.replace(config, iters=config.e2e_iters, lr_codebook=config.e2e_lr, plateau=0.0)
    info = train(modules, loss_fn, batches, settings, desc="e2e" if problem.progress else None, on_checkpoint=check,
                 sync=None if shard is None else distributed.GradSync())
    measure(info["updates"])
    for name, layer in problem.layers.items():
        layer.load_state_dict(best["layers"][name])
        layer.round_codebook_()  # calibrated = deployed
    after = end_error(blocks, cset, points.targets, device) if best["updates"] else errors[0][1]
    kept = after < errors[0][1]
    if not kept:  # nothing the pass passed through beat the walk: its layers stay
        for name, layer in problem.layers.items():
            layer.load_state_dict(walked[name])
        after = errors[0][1]
        logger.warning("the end-to-end pass raised the chain's end error (%.4g -> %.4g at its end): the walk's "
                       "layers kept", errors[0][1], errors[-1][1])
    stats = {"stage": "e2e", "mse_before": errors[0][1], "mse_after": after, "kept": kept,
             "best_at": best["updates"] if kept else 0, "errors": errors, "updates": info["updates"],
             "points": cset.rows if shard is None else shard.total, "seconds": time.perf_counter() - start}
    logger.info("end-to-end pass: chain end error %.4g -> %.4g over %d points (best of %d updates at %d, %.1f s)",
                stats["mse_before"], after, stats["points"], info["updates"], stats["best_at"], stats["seconds"])
    return stats
