"""Joint calibration (the authors' variant): every block's output error in one forward/backward.

Student blocks are fed by student blocks and teacher blocks by teacher blocks, both from the recorded block-0
inputs (calib/replay.py run_chain); the loss is the mean over blocks of each block's output error. The teacher's
targets for a minibatch are recomputed on the fly (storing all blocks' targets would take depth x (M, T, D),
24.6 GiB for DiT-XL/2 at the defaults).
"""
import logging
import time

import torch

from calib.blockwise import layer_stats, layers_of
from calib.metrics import chain_errors, weight_mse
from calib.replay import block_loss, run_chain
from calib.train import argmax_assignment, seeded_generator, train

logger = logging.getLogger(__name__)

JOINT_STREAM = 2  # random stream (seed, JOINT_STREAM) of the minibatch order
# a joint run on DiT-XL/2 takes hours, and a checkpoint holds every layer's ratios and optimizer state (GiBs):
# save one at most this often
CHECKPOINT_SECONDS = 600


def joint_loss(student_blocks, teacher_blocks, cset, rows, device):
    """Mean over blocks of the block output errors along the two chains, on the minibatch `rows`."""
    with torch.no_grad():
        targets = run_chain(teacher_blocks, cset.calls, cset.slots, cset.batched, rows, device)
    outs = run_chain(student_blocks, cset.calls, cset.slots, cset.batched, rows, device, grad=True)
    return torch.stack([block_loss(o, t) for o, t in zip(outs, targets)]).mean()


def calibrate_joint(blocks, teacher, cset, qlayers, config, device, progress=True, resume=None, on_checkpoint=None):
    """Calibrate every quantized layer at once on the calibration set `cset`.

    blocks: [(name, module)] of the quantized model; teacher: the FP model (same qualified names). Returns per-block
    stats (chain error before/after, the block's layers); every layer is hard afterwards. At most every
    CHECKPOINT_SECONDS `on_checkpoint(snapshot)` gets a `train` snapshot plus "before" (the errors before
    calibration); with the layers restored to that moment, passing the snapshot back as `resume` continues exactly.
    """
    start = time.perf_counter()
    modules = list(qlayers.values())
    student_blocks = [module for _, module in blocks]
    teacher_blocks = [teacher.get_submodule(name) for name, _ in blocks]
    fp_weights = {name: teacher.get_submodule(name).weight.detach() for name in qlayers}
    if resume is None:
        with argmax_assignment(modules):
            before = {"mse": chain_errors(student_blocks, teacher_blocks, cset, device),
                      "weight": [weight_mse(layer, fp_weights[name]) for name, layer in qlayers.items()]}
    else:
        before = resume["before"]
    last_save = time.monotonic()

    def checkpoint(snapshot):
        nonlocal last_save
        if time.monotonic() - last_save >= CHECKPOINT_SECONDS:
            on_checkpoint({**snapshot, "before": before})
            last_save = time.monotonic()

    info = train(modules, lambda idx: joint_loss(student_blocks, teacher_blocks, cset, idx, device), cset.rows,
                 config, seeded_generator(config.seed, JOINT_STREAM), progress, desc="joint", resume=resume,
                 on_checkpoint=None if on_checkpoint is None else checkpoint)
    for layer in modules:
        layer.round_codebook_()  # calibrated = deployed
    after = chain_errors(student_blocks, teacher_blocks, cset, device)
    seconds = time.perf_counter() - start
    per_layer = layer_stats(qlayers, info, before["weight"], fp_weights)
    stats = []
    for i, (name, _) in enumerate(blocks):
        stats.append({"block": i, "name": name, "mse_before": before["mse"][i], "mse_after": after[i],
                      "loss": info["loss"], "penalty": info["penalty"], "seconds": seconds,
                      "layers": layers_of(per_layer, name)})
        logger.info("block %d (%s, joint): output MSE %.4g -> %.4g", i, name, before["mse"][i], after[i])
    logger.info("joint calibration of %d layers: %.1f s", len(modules), seconds)
    return stats
