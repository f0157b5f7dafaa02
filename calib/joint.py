"""Joint calibration (the authors' code): all blocks' output MSE summed in one forward/backward.

Student blocks are fed by student blocks, starting from the cached block-0 inputs; the FP targets
of a minibatch are recomputed by the teacher on the fly (storing all blocks' targets would take
depth x (M, T, D), 24.6 GiB for DiT-XL/2 at the defaults).
"""
import logging
import time

import torch
import torch.nn.functional as F

from calib.blockwise import block_layers, layer_stats
from calib.metrics import chain_mse, weight_mse
from calib.train import argmax_assignment, seeded_generator, train

logger = logging.getLogger(__name__)

JOINT_STREAM = 2  # random stream (seed, JOINT_STREAM) of the minibatch order
# a joint run on DiT-XL/2 takes hours, and a checkpoint holds every layer's ratios and optimizer state (GiBs):
# save one at most this often
CHECKPOINT_SECONDS = 600


def calibrate_joint(model, teacher, qlayers, tokens, c, config, device, progress=True, resume=None,
                    on_checkpoint=None):
    """Calibrate every quantized layer at once on block-0 inputs tokens (M, T, D), c (M, D) (CPU).

    Returns per-block stats (output MSE along the student chain before/after, and the block's layers);
    every layer is hard afterwards. At most every CHECKPOINT_SECONDS `on_checkpoint(snapshot)` gets a
    `train` snapshot plus "before" (the errors before calibration); with the layers restored to that moment,
    passing the snapshot back as `resume` continues the run exactly.
    """
    start = time.perf_counter()
    modules = list(qlayers.values())
    fp_weights = {name: teacher.get_submodule(name).weight.detach() for name in qlayers}
    if resume is None:
        with argmax_assignment(modules):
            before = {"mse": chain_mse(model.blocks, teacher.blocks, tokens, c, device),
                      "weight": [weight_mse(layer, fp_weights[name]) for name, layer in qlayers.items()]}
    else:
        before = resume["before"]
    last_save = time.monotonic()

    def checkpoint(snapshot):
        nonlocal last_save
        if time.monotonic() - last_save >= CHECKPOINT_SECONDS:
            on_checkpoint({**snapshot, "before": before})
            last_save = time.monotonic()

    def loss_fn(idx):  # idx (B,) -> sum over blocks of MSE(student block output, FP block output)
        h = tokens[idx].to(device).float()  # (B, T, D)
        cc = c[idx].to(device)
        with torch.no_grad():
            targets, h_fp = [], h
            for fp_block in teacher.blocks:
                h_fp = fp_block(h_fp, cc)
                targets.append(h_fp)
        loss = 0.0
        for block, target in zip(model.blocks, targets):
            h = block(h, cc)
            loss = loss + F.mse_loss(h, target)
        return loss

    info = train(modules, loss_fn, tokens.shape[0], config, seeded_generator(config.seed, JOINT_STREAM),
                 progress, desc="joint", resume=resume, on_checkpoint=None if on_checkpoint is None else checkpoint)
    mse_before = before["mse"]
    mse_after = chain_mse(model.blocks, teacher.blocks, tokens, c, device)
    seconds = time.perf_counter() - start
    per_layer = layer_stats(qlayers, info, before["weight"], fp_weights)
    stats = []
    for i in range(len(model.blocks)):
        stats.append({"block": i, "mse_before": mse_before[i], "mse_after": mse_after[i], "loss": info["loss"],
                      "penalty": info["penalty"], "seconds": seconds, "layers": block_layers(per_layer, i)})
        logger.info("block %d (joint): output MSE %.4g -> %.4g", i, mse_before[i], mse_after[i])
    logger.info("joint calibration of %d layers: %.1f s", len(modules), seconds)
    return stats
