"""Joint calibration (the authors' variant): every block's output error in one forward/backward.

Student blocks are fed by student blocks and teacher blocks by teacher blocks, both from the recorded block-0
inputs (calib/replay.py run_chain); the loss is the mean over blocks of each block's output error. The teacher's
targets for a minibatch are recomputed on the fly (storing all blocks' targets would take depth x (M, T, D),
24.6 GiB for DiT-XL/2 at the defaults).
"""
import logging
import time

import torch

from vq4dit.calib.checkpoints import Checkpoint, layers_state, restore
from vq4dit.calib.metrics import block_stats, chain_errors, errors_before
from vq4dit.calib.replay import block_loss, run_chain
from vq4dit.calib.train import Minibatches, seeded_generator, train

logger = logging.getLogger(__name__)

JOINT_STREAM = 2  # random stream (seed, JOINT_STREAM) of the minibatch order
# a joint run on DiT-XL/2 takes hours, and a checkpoint holds every layer's ratios and optimizer state (GiBs):
# save one at most this often
CHECKPOINT_SECONDS = 600


def joint_loss(student_blocks, teacher_blocks, cset, rows, device):
    """Mean over blocks of the block output errors along the two chains, on the minibatch `rows`."""
    with torch.no_grad():
        targets = run_chain(teacher_blocks, cset, rows, device)
    outs = run_chain(student_blocks, cset, rows, device, grad=True)
    return torch.stack([block_loss(o, t) for o, t in zip(outs, targets)]).mean()


def calibrate_joint(problem, data, config, checkpoints, log):
    """Calibrate every quantized layer of `problem` at once on the calibration set data.cset; every layer is hard
    afterwards. At most every CHECKPOINT_SECONDS `checkpoints` saves a snapshot (with "before", the errors before
    calibration) from which a rerun continues exactly. Returns per-block stats (chain error before/after)."""
    start = time.perf_counter()
    problem.prepare_layers(problem.layers)
    _, resume = restore(checkpoints, problem.layers)
    cset, modules = data.cset, list(problem.layers.values())
    students, teachers = [m for _, m in problem.blocks], problem.teacher_blocks
    before = errors_before(problem, cset) if resume is None else resume["before"]
    last_save = time.monotonic()

    def checkpoint(snapshot):
        nonlocal last_save
        if time.monotonic() - last_save >= CHECKPOINT_SECONDS:
            checkpoints.save(Checkpoint(layers=layers_state(problem.layers), train={**snapshot, "before": before}))
            last_save = time.monotonic()

    batches = Minibatches(cset.rows, config.batch_size, seeded_generator(problem.seed, JOINT_STREAM))
    info = train(modules, lambda idx: joint_loss(students, teachers, cset, idx, problem.device), batches, config,
                 desc="joint" if problem.progress else None, resume=resume, on_checkpoint=checkpoint)
    for layer in modules:
        layer.round_codebook_()  # calibrated = deployed
    after = chain_errors(students, teachers, cset, problem.device)
    seconds = time.perf_counter() - start
    stats = block_stats(problem, info, before, after, seconds=seconds)
    for s in stats:
        logger.info("block %d (%s, joint): output MSE %.4g -> %.4g", s["block"], s["name"], s["mse_before"],
                    s["mse_after"])
    logger.info("joint calibration of %d layers: %.1f s", len(modules), seconds)
    checkpoints.save(Checkpoint.final(stats, problem.layers))
    log.append("joint", stats)
    return stats
