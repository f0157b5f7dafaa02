"""Sequential block-wise calibration (GPTQ / BRECQ style): walk the blocks once, calibrating one at a time.

Two tables of cached tensors (calib/tables.py Chains) hold what the next blocks need: the full-precision chain, and
the chain of calibrated quantized blocks (only when block_inputs == "quantized"). At block i:
1. the FP block runs on the FP chain: its outputs are block i's targets and the FP chain's next values;
2. the method prepares the block's layers (VQ4DiT: soft; with codebook_init gptvq, first refit to the input
   moments of the FP block on those inputs) and they train on the quantized chain's inputs (block_inputs == "fp":
   the FP chain's) to match the targets;
3. its codebooks are rounded to their storage precision (fp16), so what propagates is what gets saved; a layer
   whose starting point gives the block a lower error than its calibrated state keeps its start (calib/guard.py);
4. it runs once more over all points: the final error, and the quantized chain's next values.
5. with e2e_iters > 0, after the last block: the end-to-end pass (calib/endpass.py), every codebook and bias
   trained together on the quantized chain's end.
Tensors no later block reads are freed, and outputs overwrite inputs that die at block i, so walking a DiT holds
two (M, T, D) activation tensors (a block's input and its target), as a loop written for DiT would.
"""
import logging
import time

from vq4dit.calib.checkpoints import Checkpoint, layers_state, restore
from vq4dit.calib.guard import PROBE_ROWS, keep_better, starting_point
from vq4dit.calib.metrics import layer_stats, weight_mse
from vq4dit.calib.moments import block_input_moments
from vq4dit.calib.replay import Replay, call_block, rows_loss, sweep
from vq4dit.calib.shared import shared_block_loss, shared_input_moments
from vq4dit.calib.train import Minibatches, argmax_assignment, seeded_generator, train
from vq4dit.calib.walk import allocator
from vq4dit.utils import distributed

logger = logging.getLogger(__name__)

BLOCK_STREAM = 1  # random stream (seed, BLOCK_STREAM, block) of a block's minibatch order


def calibrate_block(problem, i, replay, targets, config, shard=None):
    """Train the quantized layers of block i of `problem` so that the block on the inputs `replay` gives matches
    `targets` (list of (M, ...) tensors); every layer is hard afterwards. Returns the block's stats but the final
    error. "before" is the argmax (= k-means nearest) assignment of the layers as handed in, i.e. the deployable
    model without calibration. shard: the utils.distributed.RowShard of the rows this process holds when several
    processes calibrate (torchrun); None: this process holds every point."""
    start = time.perf_counter()
    name, block = problem.blocks[i]
    layers = problem.layers_of(name)
    modules = list(layers.values())
    with argmax_assignment(modules):
        _, mse_before = sweep(block, replay, problem.device, targets=targets)
        w_before = [weight_mse(layer, problem.fp_weights[n]) for n, layer in layers.items()]
    if not modules:  # nothing of this block is quantized (--include, --exclude): no update would change it
        return {"mse_before": mse_before, "loss": None, "penalty": None, "updates": 0, "reverted": [],
                "seconds": time.perf_counter() - start, "layers": {}}
    starts = starting_point(layers)

    # L_d: the error of the block's outputs against the FP targets on a minibatch
    loss_fn = rows_loss(lambda idx: call_block(block, replay, idx, problem.device), targets, problem.device)
    points, sync, probe = replay.rows, None, replay
    if shard is not None:
        loss_fn = shared_block_loss(block, replay, targets, shard, problem.device)
        points, sync = shard.total, distributed.GradSync()
        probe = Replay(replay.call, replay.table, replay.batched, shard.below(PROBE_ROWS))  # the first global rows
    batches = Minibatches(points, config.batch_size, seeded_generator(problem.seed, BLOCK_STREAM, i))
    info = train(modules, loss_fn, batches, config, desc=name if problem.progress else None, sync=sync)
    for layer in modules:
        layer.round_codebook_()  # calibrated = deployed: later blocks see the codebooks the artifact stores
    reverted = keep_better(block, layers, starts, probe, targets, problem.device)
    return {"mse_before": mse_before, "loss": info["loss"], "penalty": info["penalty"], "updates": info["updates"],
            "reverted": reverted,
            "seconds": time.perf_counter() - start, "layers": layer_stats(layers, info, w_before, problem.fp_weights)}


def calibrate_blockwise(problem, data, config, checkpoints, log):
    """Walk the blocks of `problem` from data.walk.next_block on, in order, on the recorded data (CalibData: the
    walk's plan and state, the activation store); after each block `checkpoints` (CheckpointStore) saves the layers
    so far and what block i + 1 needs. Returns every block's stats."""
    stats, _ = restore(checkpoints, problem.layers)
    plan, walk, store, device = data.plan, data.walk, data.store, problem.device
    for i in range(walk.next_block, len(problem.blocks)):
        name, block = problem.blocks[i]
        step = plan.step(i, walk.chains)
        with problem.teacher_block(name) as teacher_block:  # streamed: on the device for this block's work
            # 1. the FP targets (and the FP chain's next values)
            targets, _ = sweep(teacher_block, step.fp_inputs, device, alloc=allocator(store, step.fp_reuse))
            # 2.-3. the method prepares the block's layers; they train on the block's inputs to match the targets
            layers = problem.layers_of(name)
            moments = None
            if problem.needs_moments and data.cset.shard is None:
                moments = block_input_moments(teacher_block, name, layers, step.inputs, device)
            elif problem.needs_moments:  # under torchrun: the moments of the layers this process fits
                moments = shared_input_moments(teacher_block, name, layers, step.inputs, data.cset.shard, device)
            problem.prepare_layers(layers, moments)
            block_stats = calibrate_block(problem, i, step.inputs, targets, config, data.cset.shard)
        # 4. the final error, and the quantized chain's next values
        alloc = allocator(store, step.q_reuse) if plan.sequential else None
        q_outs, block_stats["mse_after"] = sweep(block, step.inputs, device, alloc=alloc, targets=targets)
        last = i + 1 == len(problem.blocks)
        walk.advance(step, targets, q_outs, store.release, last)
        stats.append(log_block({"block": i, "name": name, **block_stats}))
        then = "the end-to-end pass" if last and walk.points is not None else None
        checkpoints.save(Checkpoint(i + 1, stats, layers_state(problem.layers_through(i)), walk.to_tensors(last),
                                    complete=last and then is None, then=then))
        log.append("blockwise", stats[-1:])
    return stats


def log_block(stats):
    logger.info("block %d (%s): output MSE %.4g -> %.4g (%.1f s)", stats["block"], stats["name"],
                stats["mse_before"], stats["mse_after"], stats["seconds"])
    for layer_name, s in stats["layers"].items():
        logger.info("  %s: selected %.3f before hardening (%s), weight MSE %.3g -> %.3g", layer_name, s["selected"],
                    hardened_when(s["hardened_at"]), s["weight_mse_before"], s["weight_mse_after"])
    return stats


def hardened_when(update):
    """The log's words for Trainer.finish's `hardened_at` of a layer: 0, None or the update count."""
    if update is None:  # progressive selection never froze it whole: its argmax when the updates ran out
        return "hard at the end, at its argmax"
    return "hard from the start" if update == 0 else f"hard at update {update}"
