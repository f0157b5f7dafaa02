"""Sequential block-wise calibration (GPTQ / BRECQ style): walk the blocks once, calibrating one at a time.

The walk holds at most two (M, T, D) activation tensors (fp16, CPU):
- block_inputs == "quantized": x_q, the outputs of the calibrated quantized blocks < i (block i's input),
  and x_fp, the FP activations, overwritten in place by FP block i's outputs (block i's target);
- block_inputs == "fp": x_fp (block i's input) and FP block i's outputs (its target); blocks are independent.
"""
import logging
import time

import torch.nn.functional as F

from calib.inputs import run_block
from calib.metrics import block_mse, weight_mse
from calib.train import argmax_assignment, seeded_generator, train

logger = logging.getLogger(__name__)

BLOCK_STREAM = 1  # random stream (seed, BLOCK_STREAM, block) of a block's minibatch order


def block_layers(by_name, index):
    """The entries of {layer name: value} (e.g. the VQLinear layers) that belong to block `index`, in order."""
    prefix = f"blocks.{index}."
    return {name: value for name, value in by_name.items() if name.startswith(prefix)}


def layer_stats(layers, info, w_before, fp_weights):
    """{name: selection outcome and weight MSE vs FP before/after} for layers {name: VQLinear} in `train` order."""
    return {name: {"selected": info["selected"][j], "hardened_at": info["hardened_at"][j],
                   "weight_mse_before": w_before[j], "weight_mse_after": weight_mse(layer, fp_weights[name])}
            for j, (name, layer) in enumerate(layers.items())}


def calibrate_block(block, layers, fp_weights, x_in, c, target, config, generator, device, progress=True, index=0,
                    out=None):
    """Calibrate the quantized layers of one block so block(x_in, c) matches target; returns its stats.

    x_in, target (M, T, D) and c (M, D) on CPU; layers {name: VQLinear} inside `block`; fp_weights
    {name: FP weight (out, in)}. Every layer is hard afterwards; with `out` (M, T, D), possibly x_in itself,
    the calibrated block's outputs are written there by the same sweep that measures the final error.
    "before" is the argmax (= k-means nearest) assignment of the layers as handed in, i.e. the deployable
    model without calibration.
    """
    start = time.perf_counter()
    modules = list(layers.values())
    with argmax_assignment(modules):
        mse_before = block_mse(block, x_in, c, target, device)
        w_before = [weight_mse(layer, fp_weights[name]) for name, layer in layers.items()]

    def loss_fn(idx):  # idx (B,) -> L_d: MSE of the block output vs the FP target on the minibatch
        out = block(x_in[idx].to(device).float(), c[idx].to(device))  # (B, T, D)
        return F.mse_loss(out, target[idx].to(device).float())

    info = train(modules, loss_fn, x_in.shape[0], config, generator, progress, desc=f"block {index}")
    mse_after = block_mse(block, x_in, c, target, device, out=out)
    stats = {
        "block": index, "mse_before": mse_before, "mse_after": mse_after, "loss": info["loss"],
        "penalty": info["penalty"], "seconds": time.perf_counter() - start,
        "layers": layer_stats(layers, info, w_before, fp_weights),
    }
    logger.info("block %d: output MSE %.4g -> %.4g (%.1f s)", index, mse_before, mse_after, stats["seconds"])
    for name, s in stats["layers"].items():
        logger.info("  %s: selected %.3f before hardening (hard at iteration %s), weight MSE %.3g -> %.3g", name,
                    s["selected"], s["hardened_at"], s["weight_mse_before"], s["weight_mse_after"])
    return stats


def calibrate_blockwise(model, teacher, qlayers, config, acts, start, device, on_block_done, progress=True):
    """Calibrate blocks start..depth-1 in order, mutating `acts` as the walk advances.

    acts: {"x_fp": (M, T, D), "c": (M, D)} plus "x_q" (M, T, D) when block_inputs == "quantized", holding
    the inputs of block `start`. After block i, `on_block_done(i, stats, acts)` sees the inputs of block
    i + 1 (the resumable state). Returns the stats of the blocks calibrated here.
    """
    fp_weights = {name: teacher.get_submodule(name).weight.detach() for name in qlayers}
    sequential = config.block_inputs == "quantized"
    c = acts["c"]
    out = []
    for i in range(start, len(model.blocks)):
        # the FP target; in sequential mode the FP input is needed no more, so overwrite it in place
        target = run_block(teacher.blocks[i], acts["x_fp"], c, device, out=acts["x_fp"] if sequential else None)
        x_in = acts["x_q"] if sequential else acts["x_fp"]
        stats = calibrate_block(model.blocks[i], block_layers(qlayers, i), fp_weights, x_in, c, target, config,
                                seeded_generator(config.seed, BLOCK_STREAM, i), device, progress, index=i,
                                out=acts["x_q"] if sequential else None)  # x_q advances to block i + 1's input
        acts["x_fp"] = target
        out.append(stats)
        on_block_done(i, stats, acts)
    return out
