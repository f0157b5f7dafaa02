"""The record and calibrate stages of the quantize job, for any model an adapter describes.

record: the FP teacher samples with its own sampler; the block calls at the kept steps become the calibration set
(calib/teacher.py, calib/capture.py: wiring + cached slots). A run that resumes takes them from its saved state
instead. Online calibration (the authors' recipe) trains on the teacher's live steps: it records only a small set
that measures its block errors before and after.
calibrate: one of the modes in MODES walks the blocks (calib/blockwise.py), trains all at once (calib/joint.py) or
updates at every teacher step (calib/online.py). The CalibState saves after every block (joint, online: every few
minutes), so calling again with the same config resumes there; per-block stats go to <out_dir>/calib_log.jsonl.
"""
import logging
from dataclasses import dataclass

from calib.blockwise import calibrate_blockwise
from calib.capture import CalibrationSet
from calib.endpass import EndPoints, points_tensors
from calib.joint import calibrate_joint
from calib.online import calibrate_online
from calib.tables import Chains
from calib.teacher import eval_teacher, record_set, teacher_plan

logger = logging.getLogger(__name__)

MODES = {"blockwise": calibrate_blockwise, "joint": calibrate_joint, "online": calibrate_online}
# online calibration's error report: block errors on this many teacher samples x steps (not trained on)
ONLINE_EVAL_SAMPLES, ONLINE_EVAL_STEPS = 4, 10


@dataclass
class CalibData:
    """What calibration trains on: the calibration set (online: the small evaluation set), the block walk's tables
    at the resume point (offline modes), the online teacher plan, the store that holds the activations, and the
    end-to-end pass's points (block-wise with e2e_iters > 0, else None)."""

    cset: CalibrationSet
    chains: Chains | None
    plan: object
    store: object
    points: EndPoints | None = None


def record(problem, teacher, calibration, store, state):
    """The record stage: CalibData for TeacherConfig `teacher` and CalibConfig `calibration`, recorded from the
    teacher of `problem` into `store`, or restored from `state` (CalibState) when the run resumes."""
    if calibration.calib == "online":
        evalset = record_set(problem, eval_teacher(teacher, ONLINE_EVAL_SAMPLES, ONLINE_EVAL_STEPS), store, False)
        if state.meta is None:
            state.start(None, None)
        else:
            logger.info("resuming calibration at %s from %s", state.resume_point(), state.out_dir)
        return CalibData(evalset, None, teacher_plan(teacher, problem.seed, online=True), store)
    sequential = calibration.calib == "blockwise" and calibration.block_inputs == "quantized"
    if state.meta is None:
        cset = record_set(problem, teacher, store)
        chains = Chains.from_slots(cset.slots, sequential)
        points = EndPoints.take(cset) if calibration.e2e_iters else None
        state.start(cset.wiring_json(), {**chains.to_tensors(), **points_tensors(points)})
    else:
        acts = state.saved.acts
        chains = Chains.from_tensors({k: store.adopt(t) for k, t in acts.items()}, sequential)
        cset = CalibrationSet.from_json(state.meta["wiring"], chains.slots())
        points = EndPoints.from_tensors(acts, cset.batched)
        logger.info("resuming calibration at %s from %s", state.resume_point(), state.out_dir)
    return CalibData(cset, chains, None, store, points)


def calibrate(problem, data, calibration, state):
    """The calibrate stage: train the quantized layers of `problem` in place with the mode calibration.calib;
    every layer is hard afterwards. Returns the per-block stats (list of dicts)."""
    problem.student.eval()
    problem.teacher.eval()
    try:
        if state.complete:  # finished before an interruption: the saved layers are it
            state.restore(problem.layers)
            return state.stats
        return MODES[calibration.calib](problem, data, calibration, state)
    except KeyboardInterrupt:
        logger.warning("interrupted: rerun with the same config and output directory %s to resume at %s",
                       state.out_dir, state.resume_point() or "the start")
        raise
