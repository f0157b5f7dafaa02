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

from calib.calls import leaves
from calib.capture import storage_dtype
from calib.endpass import end_pass, points_tensors
from calib.guard import keep_better, starting_point
from calib.metrics import weight_mse
from calib.moments import block_input_moments
from calib.replay import Replay, block_loss, call_block, sweep
from calib.tables import Out, ref_of
from calib.train import Minibatches, argmax_assignment, seeded_generator, train

logger = logging.getLogger(__name__)

BLOCK_STREAM = 1  # random stream (seed, BLOCK_STREAM, block) of a block's minibatch order


def layer_stats(layers, info, w_before, fp_weights):
    """{name: selection outcome and weight MSE vs FP before/after} for layers {name: VQLinear} in `train` order."""
    return {name: {"selected": info["selected"][j], "hardened_at": info["hardened_at"][j],
                   "weight_mse_before": w_before[j], "weight_mse_after": weight_mse(layer, fp_weights[name])}
            for j, (name, layer) in enumerate(layers.items())}


def last_uses(calls):
    """{table reference: index of the last block that reads it}."""
    last = {}
    for i, call in enumerate(calls):
        for node in leaves(call.inputs):
            last[ref_of(node)] = i
    return last


def allocator(store, reusable):
    """Output storage: a dying input of the same shape and dtype when there is one (written in place), else new."""
    def alloc(outs, num_rows):
        free, chosen = list(reusable), []
        for o in outs:
            shape, dtype = (num_rows, *o.shape[1:]), storage_dtype(o, store.token_dtype)
            j = next((j for j, t in enumerate(free) if tuple(t.shape) == shape and t.dtype == dtype), None)
            chosen.append(free.pop(j) if j is not None else store.empty(shape, dtype))
        return chosen
    return alloc


def calibrate_block(problem, i, replay, targets, config):
    """Train the quantized layers of block i of `problem` so that the block on the inputs `replay` gives matches
    `targets` (list of (M, ...) tensors); every layer is hard afterwards. Returns the block's stats but the final
    error. "before" is the argmax (= k-means nearest) assignment of the layers as handed in, i.e. the deployable
    model without calibration."""
    start = time.perf_counter()
    name, block = problem.blocks[i]
    layers = problem.layers_of(name)
    modules = list(layers.values())
    with argmax_assignment(modules):
        _, mse_before = sweep(block, replay, problem.device, targets=targets)
        w_before = [weight_mse(layer, problem.fp_weights[n]) for n, layer in layers.items()]
    starts = starting_point(layers)

    def loss_fn(idx):  # idx (B,) -> L_d: error of the block's outputs vs the FP targets on the minibatch
        return block_loss(call_block(block, replay, idx, problem.device), [t[idx] for t in targets])

    batches = Minibatches(replay.rows, config.batch_size, seeded_generator(problem.seed, BLOCK_STREAM, i))
    info = train(modules, loss_fn, batches, config, desc=name if problem.progress else None)
    for layer in modules:
        layer.round_codebook_()  # calibrated = deployed: later blocks see the codebooks the artifact stores
    reverted = keep_better(block, layers, starts, replay, targets, problem.device)
    return {"mse_before": mse_before, "loss": info["loss"], "penalty": info["penalty"], "updates": info["updates"],
            "reverted": reverted,
            "seconds": time.perf_counter() - start, "layers": layer_stats(layers, info, w_before, problem.fp_weights)}


def calibrate_blockwise(problem, data, config, state):
    """Calibrate the blocks of `problem` from state.next_block on, in order, on the recorded data (CalibData: the
    calibration set, its Chains at that block, the activation store); after each block, `state` saves what block
    i + 1 needs (the resumable state). Returns every block's stats."""
    state.restore(problem.layers)
    cset, chains, store, device = data.cset, data.chains, data.store, problem.device
    sequential = chains.q is not None
    last_use, stats = last_uses(cset.calls), state.stats
    for i in range(state.next_block, len(problem.blocks)):
        name, block = problem.blocks[i]
        dying = [ref for ref in chains.fp if last_use.get(ref, -1) <= i]
        # 1. the FP targets; in sequential mode nobody reads the FP inputs afterwards, so they may be overwritten
        reuse = [chains.fp[ref] for ref in dying if isinstance(ref, Out)] if sequential else []
        fp_inputs = Replay(cset.calls[i], chains.fp, cset.batched, cset.rows)
        targets, _ = sweep(problem.teacher.get_submodule(name), fp_inputs, device, alloc=allocator(store, reuse))
        # 2.-3. the method prepares the block's layers; they train on the block's inputs to match the targets
        inputs = Replay(cset.calls[i], chains.q, cset.batched, cset.rows) if sequential else fp_inputs
        layers = problem.layers_of(name)
        moments = block_input_moments(problem.teacher.get_submodule(name), name, layers, inputs, device) \
            if problem.needs_moments else None
        problem.prepare_layers(layers, moments)
        block_stats = calibrate_block(problem, i, inputs, targets, config)
        # 4. the final error, and the quantized chain's next values
        alloc = allocator(store, [chains.q[ref] for ref in dying]) if sequential else None
        q_outs, block_stats["mse_after"] = sweep(block, inputs, device, alloc=alloc, targets=targets)
        last = i + 1 == len(problem.blocks)
        if last and data.points is not None:
            data.points.set_targets(targets)
        chains.advance(i, targets, q_outs, dying, store.release)
        stats.append(log_block({"block": i, "name": name, **block_stats}))
        acts = {} if last else chains.to_tensors()
        then = "the end-to-end pass" if last and data.points is not None else None
        state.block_done(stats, problem.layers_through(i), {**acts, **points_tensors(data.points)},
                         complete=last and then is None, then=then)
    if data.points is not None:  # 5. the end-to-end pass over the whole chain
        state.pass_done("e2e", end_pass(problem, cset.calls, data.points, config), stats, problem.layers)
    return stats


def log_block(stats):
    logger.info("block %d (%s): output MSE %.4g -> %.4g (%.1f s)", stats["block"], stats["name"],
                stats["mse_before"], stats["mse_after"], stats["seconds"])
    for layer_name, s in stats["layers"].items():
        logger.info("  %s: selected %.3f before hardening (hard at iteration %s), weight MSE %.3g -> %.3g",
                    layer_name, s["selected"], s["hardened_at"], s["weight_mse_before"], s["weight_mse_after"])
    return stats
