"""Online calibration, the authors' recipe (docs/method.md "The authors' calibration"): one update per teacher
sampler step, on data that is never repeated.

Each trajectory draws `online_batch` samples (4 classes in the authors' code) and runs the FP teacher's own
sampler (CFG 4.0 in their script). At every step the hooks of calib/record.py hand over the teacher's block
outputs (teacher blocks fed by teacher blocks) and the model's inputs; the student runs its own forward on the
same inputs (student blocks fed by student blocks), and the loss is the mean over blocks of each block's output
error: one Trainer update (RMSprop; with the recipe's options: L_r behind a running-minimum gate that resets at
every trajectory, codebooks frozen while their layer is soft, selection at every step).
The run is resumable at trajectory boundaries: a trajectory's noise and classes depend only on its index.
"""
import logging
import time

import torch
from tqdm import tqdm

from vq4dit.calib.checkpoints import Checkpoint, layers_state, restore
from vq4dit.calib.metrics import block_stats, chain_errors, errors_before
from vq4dit.calib.record import BlockRecorder, recording
from vq4dit.calib.replay import block_loss
from vq4dit.calib.train import Trainer, seeded_generator
from vq4dit.utils.precision import update_autocast

logger = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 600  # save the layers and the optimizer at most this often (at a trajectory boundary)
DROPOUT_STREAM = 3  # random stream (seed, DROPOUT_STREAM) of the student's label dropout


def student_outputs(model, blocks, args, kwargs):
    """The student's own forward on the model inputs `args, kwargs`: every block's outputs, with gradients."""
    captured = []
    with BlockRecorder(model, blocks, keep=lambda step: True, on_call=captured.append,
                       keep_outputs=True), torch.enable_grad():
        model(*args, **kwargs)
    return captured[0].outputs


def calibrate_online(problem, data, config, checkpoints, log):
    """Calibrate every quantized layer of `problem` along the teacher trajectories of data.plan (one trajectory per
    plan.batch_size samples); every layer is hard afterwards. Block errors before and after are measured on the
    small recorded set data.cset (not trained on). Resumable at trajectory boundaries: at most every
    CHECKPOINT_SECONDS, after a trajectory, `checkpoints` saves {"trajectory": trajectories done,
    **Trainer.snapshot()}."""
    problem.prepare_layers(problem.layers)
    _, resume = restore(checkpoints, problem.layers)
    before = errors_before(problem, data.cset) if resume is None else resume["before"]
    info = train_online(problem, data.plan, config, resume,
                        lambda snapshot: checkpoints.save(Checkpoint(layers=layers_state(problem.layers),
                                                                     train={**snapshot, "before": before})))
    after = chain_errors([m for _, m in problem.blocks], problem.teacher_blocks, data.cset, problem.device)
    stats = block_stats(problem, info, before, after, updates=info["updates"])
    for s in stats:
        logger.info("block %d (%s, online): output MSE %.4g -> %.4g", s["block"], s["name"], s["mse_before"],
                    s["mse_after"])
    checkpoints.save(Checkpoint.final(stats, problem.layers))
    log.append("online", stats)
    return stats


def train_online(problem, plan, config, resume=None, on_checkpoint=None):
    """The online updates: returns Trainer.finish()'s info plus "updates" and "trajectories"."""
    model, teacher, adapter = problem.student, problem.teacher, problem.adapter
    blocks = problem.blocks
    trainer = Trainer(list(problem.layers.values()), config, resume)
    done = 0 if resume is None else resume["trajectory"]
    dropout = None  # the label-dropout draws of the current trajectory: (seed, DROPOUT_STREAM, trajectory)

    def on_step(live):
        args, kwargs = live.model_args, live.model_kwargs
        if config.student_label_dropout > 0:
            args, kwargs = adapter.drop_labels(model, args, kwargs, config.student_label_dropout, dropout)
        with update_autocast(config.step_dtype, problem.device):
            outs = student_outputs(model, blocks, args, kwargs)
        with torch.enable_grad():
            trainer.step(torch.stack([block_loss(o, t) for o, t in zip(outs, live.outputs)]).mean())

    total = -(-plan.num_samples // plan.batch_size)
    logger.info("online calibration: %d trajectories x %d steps = %d updates (%d trajectories done)", total,
                plan.steps, total * plan.steps, done)
    bar = tqdm(total=total, initial=done, desc="online", unit="trajectory", disable=not problem.progress)
    last_save = time.monotonic()
    with recording(teacher, adapter.blocks(teacher), lambda step: True, on_step, keep_outputs=True) as recorder, \
            torch.no_grad():
        for index, (_, run) in enumerate(adapter.teacher_runs(teacher, plan, problem.device)):
            if index < done:
                continue
            dropout = seeded_generator(problem.seed, DROPOUT_STREAM, index)
            recorder.new_batch()
            trainer.new_trajectory()
            run()
            bar.update(1)
            bar.set_postfix(loss=f"{trainer.loss.item():.3g}", hard=sum(layer.is_hard for layer in trainer.layers))
            if on_checkpoint is not None and time.monotonic() - last_save >= CHECKPOINT_SECONDS and index + 1 < total:
                on_checkpoint({"trajectory": index + 1, **trainer.snapshot()})
                last_save = time.monotonic()
    bar.close()
    info = trainer.finish()
    for layer in problem.layers.values():
        layer.round_codebook_()  # calibrated = deployed
    return {**info, "updates": trainer.updates, "trajectories": total}
