"""Calibration modes as objects, registered by name (`calib` in the config): block-wise, joint and online.

Each mode owns how it records its teacher data, how it calibrates, what its data needs at least (to refuse a run
that cannot fit before k-means), how many rows it records, and which options it refuses. The quantize job and the
memory plan ask the mode; nothing else branches on its name. A mode's options are checked when the config is
(calib/config.py), before torch is imported, so each mode imports its implementation where it runs.
- blockwise: record the calibration set, walk the blocks one at a time (calib/blockwise.py), then the optional
  end-to-end pass (calib/endpass.py) as a stage of its own;
- joint: record the calibration set, train every layer at once on every block's error (calib/joint.py);
- online: the authors' recipe, one update per teacher sampler step (calib/online.py); it records only a small set
  that measures its block errors before and after.
"""
import logging
from dataclasses import dataclass

from vq4dit.calib.config import CALIB_MODES, invalid

logger = logging.getLogger(__name__)

# online calibration's error report: block errors on this many teacher samples x steps (not trained on)
ONLINE_EVAL_SAMPLES, ONLINE_EVAL_STEPS = 4, 10


@dataclass
class CalibData:
    """What a mode calibrates on: the calibration set (online: the small evaluation set), the activation store
    that holds it, and the mode's plan (block-wise: the WalkPlan; online: the teacher's TeacherPlan) and walk state
    (block-wise: the WalkState at the resume point)."""

    cset: object
    store: object
    plan: object = None
    walk: object = None


@dataclass(frozen=True)
class Footprint:
    """The least a mode's teacher data needs: `rows` rows of `value_bytes`-byte values, each row at least one token
    of the first block's input wide, in host memory and disk (on_device: the model's device); `flag` `count` is the
    option that sets it."""

    flag: str
    count: int
    rows: int
    value_bytes: int
    on_device: bool = False


class CalibMode:
    """The offline modes' recording (shared by blockwise and joint); subclasses say how they calibrate."""

    name = None
    walks_blocks = False  # the block-wise walk: one block's layers soft at a time (else every layer from the start)

    def sequential(self, calibration):
        """Whether block i trains on the quantized chain's outputs (the walk's second table)."""
        return False

    def validate(self, calibration):
        """Refuse the options of CalibConfig `calibration` this mode ignores (a flag that does nothing is an error)."""
        if calibration.e2e_iters:
            invalid("e2e_iters", calibration.e2e_iters, f"an end-to-end pass follows the block-wise walk only (calib="
                    f"{self.name!r}; use e2e_iters=0)")

    def teacher_plan(self, teacher, seed):
        from vq4dit.calib.teacher import teacher_plan

        return teacher_plan(teacher, seed)

    def footprint(self, teacher, plan, rows_per_trajectory, cache_dtype_bytes):
        """The Footprint of TeacherConfig `teacher`'s data, sampled as this mode's TeacherPlan `plan`."""
        from vq4dit.calib.teacher import recorded_rows

        return Footprint("--calib-samples", teacher.calib_samples,
                         recorded_rows(plan, teacher.calib_timesteps, rows_per_trajectory), cache_dtype_bytes)

    def record(self, problem, teacher, calibration, store, checkpoints, log):
        """The record stage: CalibData recorded from the teacher of `problem` into `store` with TeacherConfig
        `teacher`, or restored from the last checkpoint when the run resumes."""
        from vq4dit.calib.capture import CalibrationSet
        from vq4dit.calib.checkpoints import Checkpoint
        from vq4dit.calib.teacher import record_set, teacher_share
        from vq4dit.calib.walk import WalkPlan, WalkState
        from vq4dit.utils import distributed

        sequential = self.sequential(calibration)
        saved = checkpoints.load()
        if saved is None:
            cset = record_set(problem, teacher, store)
            walk = WalkState.start(cset, sequential, calibration.e2e_iters > 0)
            log.clear()
            checkpoints.save(Checkpoint(acts=walk.to_tensors(False), wiring=cset.wiring_json()))
        else:
            acts = {k: store.adopt(t) for k, t in saved.acts.items()}
            batched = saved.wiring["batched"]
            walk = WalkState.from_tensors(acts, batched, sequential, saved.next_block)
            cset = CalibrationSet.from_json(saved.wiring, walk.chains.slots())
            if distributed.active():  # under torchrun: which of the single-process points this rank holds
                cset.shard = teacher_share(problem, teacher).shard()
            logger.info("resuming calibration at %s from %s", saved.resume_point, checkpoints.out_dir)
        return CalibData(cset, store, WalkPlan(cset.calls, cset.batched, cset.rows, sequential), walk)

    def calibrate(self, problem, data, calibration, checkpoints, log):
        raise NotImplementedError


class Blockwise(CalibMode):
    name = "blockwise"
    walks_blocks = True

    def sequential(self, calibration):
        return calibration.block_inputs == "quantized"

    def validate(self, calibration):
        pass

    def calibrate(self, problem, data, calibration, checkpoints, log):
        from vq4dit.calib.blockwise import calibrate_blockwise
        from vq4dit.calib.endpass import end_pass_stage

        stats = calibrate_blockwise(problem, data, calibration, checkpoints, log)
        if data.walk.points is not None:
            end_pass_stage(problem, data, calibration, checkpoints, log, stats)
        return stats


class Joint(CalibMode):
    name = "joint"

    def calibrate(self, problem, data, calibration, checkpoints, log):
        from vq4dit.calib.joint import calibrate_joint

        return calibrate_joint(problem, data, calibration, checkpoints, log)


class Online(CalibMode):
    name = "online"

    def validate(self, calibration):
        super().validate(calibration)
        if calibration.lr_schedule != "constant":
            invalid("lr_schedule", calibration.lr_schedule, "calib online makes one update per teacher step, not "
                    "`iters` updates: use lr_schedule=constant")
        if calibration.micro_batch is not None:
            invalid("micro_batch", calibration.micro_batch, "calib online updates on the teacher's sampler step, not "
                    "on minibatches of recorded points: leave it unset")

    def teacher_plan(self, teacher, seed):
        from vq4dit.calib.teacher import teacher_plan

        return teacher_plan(teacher, seed, online=True)

    def footprint(self, teacher, plan, rows_per_trajectory, cache_dtype_bytes):
        """One trajectory batch's rows, in fp32 on the model's device."""
        return Footprint("--online-batch", teacher.online_batch, plan.batch_size * rows_per_trajectory, 4, True)

    def record(self, problem, teacher, calibration, store, checkpoints, log):
        from vq4dit.calib.teacher import eval_teacher, record_set

        evalset = record_set(problem, eval_teacher(teacher, ONLINE_EVAL_SAMPLES, ONLINE_EVAL_STEPS), store, False)
        saved = checkpoints.load()
        if saved is None:
            log.clear()
        else:
            logger.info("resuming calibration at %s from %s", saved.resume_point, checkpoints.out_dir)
        return CalibData(evalset, store, self.teacher_plan(teacher, problem.seed))

    def calibrate(self, problem, data, calibration, checkpoints, log):
        from vq4dit.calib.online import calibrate_online

        return calibrate_online(problem, data, calibration, checkpoints, log)


MODES = {mode.name: mode for mode in (Blockwise(), Joint(), Online())}
assert tuple(MODES) == CALIB_MODES, "calib/config.py's CALIB_MODES names the registered modes"


def mode_for(name):
    return MODES[name]


def calibrate(problem, data, mode, calibration, checkpoints, log):
    """The calibrate stage: train the quantized layers of `problem` in place with CalibMode `mode`; every layer is
    hard afterwards. A finished calibration saved before an interruption is restored as it is. Returns the
    per-block stats (list of dicts)."""
    problem.student.eval()
    problem.teacher.eval()
    saved = checkpoints.load()
    if saved is not None and saved.complete:
        saved.restore(problem.layers)
        return saved.stats
    # Ctrl-C: the caller says where a rerun resumes (quantize.py's last line; quantize_transformer's warning)
    return mode.calibrate(problem, data, calibration, checkpoints, log)
