"""The zero-data teacher: which trajectories the FP model samples, and recording the calibration set from them.

Under torchrun (several processes) each process samples and records its share of the trajectories (TeacherShare)
and holds only those points; their rows are put in the order the single process records them in, and the
calibration set's shard says which of the single-process points they are.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from vq4dit.calib.capture import Schedule, calib_steps, capture, step_filter
from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError

TEACHER_BATCH = 64  # trajectories sampled at once by the teacher (offline modes)
CHUNKS_PER_PROCESS = 4  # under torchrun: each process samples at least this many chunks of trajectories


def teacher_plan(teacher, seed, online=False):
    """The TeacherPlan of TeacherConfig `teacher`: calib_samples samples in batches of TEACHER_BATCH; online:
    calib_samples trajectories of online_batch samples each, one batch per trajectory."""
    from vq4dit.models.adapters import TeacherPlan

    if online:
        return TeacherPlan(teacher.calib_samples * teacher.online_batch, teacher.steps, teacher.cfg_scale, seed,
                           teacher.online_batch)
    return TeacherPlan(teacher.calib_samples, teacher.steps, teacher.cfg_scale, seed, TEACHER_BATCH)


def recorded_rows(plan, calib_timesteps, rows_per_trajectory):
    """The rows of a calibration set recorded from TeacherPlan `plan`: its samples x the `calib_timesteps` steps
    kept of each trajectory x `rows_per_trajectory` (2 where CFG doubles the batch)."""
    return plan.num_samples * len(calib_steps(plan.steps, calib_timesteps)) * rows_per_trajectory


def schedule(adapter, model, teacher, plan, device):
    """The recording Schedule of `plan`: calib_timesteps kept steps per trajectory, rows doubled by CFG."""
    rows = recorded_rows(plan, teacher.calib_timesteps, adapter.rows_per_trajectory(plan))
    return Schedule(adapter.teacher_runs(model, plan, device), step_filter(plan.steps, teacher.calib_timesteps), rows,
                    plan.num_samples)


def record_set(problem, teacher, store, progress=None):
    """Run the FP teacher of `problem` and record the calibration set of TeacherConfig `teacher` (calib_samples x
    calib_timesteps points, doubled by CFG) into `store`."""
    progress = problem.progress if progress is None else progress
    if distributed.active():
        return record_share(problem, teacher, store, progress)
    model, adapter = problem.teacher, problem.adapter
    plan = teacher_plan(teacher, problem.seed)
    return capture(model, adapter.blocks(model), schedule(adapter, model, teacher, plan, problem.device), store,
                   progress)


def eval_teacher(teacher, samples, steps):
    """A small TeacherConfig of `teacher`'s guidance: `samples` trajectories, at most `steps` kept steps each."""
    return dataclasses.replace(teacher, calib_samples=samples, calib_timesteps=min(steps, teacher.steps))


@dataclass(frozen=True)
class TeacherShare:
    """This process's share of the teacher's trajectories when several processes calibrate (torchrun): the plan it
    samples with (`plan`: chunks of `plan.batch_size` trajectories, a power of two that divides the single-process
    batch, dealt round-robin), which trajectories it runs (`owned`, (N,) bool), and
    `rows`: the position in the single-process calibration set of each row it records, in recording order."""

    plan: object
    owned: np.ndarray
    rows: np.ndarray
    total: int

    @classmethod
    def of(cls, plan, kept, copies, rank, world_size):
        """The share of `rank` of TeacherPlan `plan` recorded at `kept` steps per trajectory, `copies` rows per
        trajectory (2 with CFG)."""
        n = plan.num_samples
        if n < world_size:
            raise UserError(f"--calib-samples {n}: fewer teacher trajectories than the {world_size} processes; give "
                            f"at least {world_size}")
        # at least 4 chunks per process (so that no process holds more than about 1.25 times another's rows), each
        # a power of two, so that a chunk lies inside one single-process batch
        chunk = 1 << (min(plan.batch_size, max(1, n // (CHUNKS_PER_PROCESS * world_size))).bit_length() - 1)
        owned = np.zeros(n, bool)
        owned[distributed.shard(n, rank, world_size, block=chunk)] = True
        rows = [single_process_rows(np.arange(s, min(s + chunk, n)), plan.batch_size, n, kept, copies)
                for s in range(0, n, chunk) if owned[s]]
        return cls(dataclasses.replace(plan, batch_size=chunk), owned, np.concatenate(rows), n * kept * copies)

    def runs(self, runs):
        """The (trajectories, run) pairs of an adapter's `runs` (for `plan`) that this process samples."""
        start = 0
        for count, run in runs:
            mine = self.owned[start:start + count]
            if mine.any() != mine.all():
                raise RuntimeError(f"the teacher ran trajectories {start}..{start + count - 1} in one batch, across "
                                   "the shares of two processes")
            if mine.all():
                yield count, run
            start += count

    def shard(self):
        """The RowShard of the rows once sorted (record_set stores them in ascending single-process order)."""
        return distributed.RowShard(np.sort(self.rows), self.total)


def largest_share(plan, kept, copies, world_size, among=None):
    """The most rows any one of `world_size` processes records of TeacherPlan `plan` (see TeacherShare.of); with
    `among` (global positions), the most of those that any one process holds."""
    shares = [TeacherShare.of(plan, kept, copies, r, world_size).rows for r in range(world_size)]
    return max(len(rows) if among is None else int(np.isin(among, rows).sum()) for rows in shares)


def single_process_rows(trajectories, batch, n, kept, copies):
    """Positions, in the calibration set one process records (batches of `batch` of the `n` trajectories; per batch,
    per kept step, the model call's rows: `copies` blocks of the batch's trajectories), of the rows that the
    consecutive `trajectories` (inside one batch) give when sampled as one batch, in their recording order."""
    first = trajectories[0] // batch * batch
    in_batch = min(batch, n - first)
    k, c, j = np.meshgrid(np.arange(kept), np.arange(copies), trajectories - first, indexing="ij")
    return (first * kept * copies + k * in_batch * copies + c * in_batch + j).reshape(-1)


def teacher_share(problem, teacher):
    """This rank's TeacherShare of TeacherConfig `teacher`'s calibration set."""
    plan = teacher_plan(teacher, problem.seed)
    kept = len(calib_steps(plan.steps, teacher.calib_timesteps))
    return TeacherShare.of(plan, kept, problem.adapter.rows_per_trajectory(plan), distributed.rank(),
                           distributed.size())


def record_share(problem, teacher, store, progress):
    """record_set's work for one of several processes: the trajectories of its TeacherShare, then its rows sorted
    into single-process order (in place), the CalibrationSet's shard saying which points they are."""
    model, adapter = problem.teacher, problem.adapter
    share = teacher_share(problem, teacher)
    plan, keep = share.plan, step_filter(share.plan.steps, teacher.calib_timesteps)
    runs = share.runs(adapter.teacher_runs(model, plan, problem.device))
    cset = capture(model, adapter.blocks(model), Schedule(runs, keep, len(share.rows), int(share.owned.sum())), store,
                   progress)
    order = torch.from_numpy(np.argsort(share.rows, kind="stable"))
    if not bool((order == torch.arange(len(order))).all()):
        for key, t in cset.slots.items():
            if cset.batched[key]:
                t.copy_(t[order])
    return dataclasses.replace(cset, shard=share.shard())
