"""The zero-data teacher: which trajectories the FP model samples, and recording the calibration set from them."""
import dataclasses

from vq4dit.calib.capture import Schedule, calib_steps, capture, step_filter

TEACHER_BATCH = 64  # trajectories sampled at once by the teacher (offline modes)


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
    model, adapter = problem.teacher, problem.adapter
    plan = teacher_plan(teacher, problem.seed)
    progress = problem.progress if progress is None else progress
    return capture(model, adapter.blocks(model), schedule(adapter, model, teacher, plan, problem.device), store,
                   progress)


def eval_teacher(teacher, samples, steps):
    """A small TeacherConfig of `teacher`'s guidance: `samples` trajectories, at most `steps` kept steps each."""
    return dataclasses.replace(teacher, calib_samples=samples, calib_timesteps=min(steps, teacher.steps))
