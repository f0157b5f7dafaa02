"""Sequential block-wise calibration (GPTQ / BRECQ style): walk the blocks once, calibrating one at a time.

Two tables of cached tensors (calib/replay.py) hold what the next blocks need: "fp", the full-precision chain,
and "q", the chain of calibrated quantized blocks (only when block_inputs == "quantized"). At block i:
1. the FP block runs on the fp table: its outputs are block i's targets and the fp chain's next values;
2. the quantized block trains on the q table's inputs (block_inputs == "fp": the fp table's) to match them;
3. its codebooks are rounded to their storage precision (fp16), so what propagates is what gets saved;
4. it runs once more over all points: the final error, and the q chain's next values.
Tensors no later block reads are freed, and outputs overwrite inputs that die at block i, so walking a DiT holds
two (M, T, D) activation tensors (a block's input and its target), as a loop written for DiT would.
"""
import logging
import time

from calib.calls import leaves
from calib.capture import storage_dtype
from calib.metrics import weight_mse
from calib.record import out_key, ref_key
from calib.replay import block_loss, call_block, sweep
from calib.train import argmax_assignment, seeded_generator, train

logger = logging.getLogger(__name__)

BLOCK_STREAM = 1  # random stream (seed, BLOCK_STREAM, block) of a block's minibatch order


def layers_of(by_name, block_name):
    """The entries of {layer name: value} that belong to the block named `block_name`, in order."""
    prefix = f"{block_name}."
    return {name: value for name, value in by_name.items() if name.startswith(prefix)}


def layer_stats(layers, info, w_before, fp_weights):
    """{name: selection outcome and weight MSE vs FP before/after} for layers {name: VQLinear} in `train` order."""
    return {name: {"selected": info["selected"][j], "hardened_at": info["hardened_at"][j],
                   "weight_mse_before": w_before[j], "weight_mse_after": weight_mse(layer, fp_weights[name])}
            for j, (name, layer) in enumerate(layers.items())}


def soften(layers, fp_weights, config):
    """VQ4DiT: give the hard layers of the block about to be calibrated their candidate sets (the quantize job keeps
    layers hard until then: 0.25 instead of 2.75 bytes per weight at W2 for every block not in calibration). The
    result is what quantizing them soft gives; codebook-only calibration keeps them hard."""
    if config.method != "vq4dit":
        return
    for name, layer in layers.items():
        if layer.is_hard:
            layer.soften_(fp_weights[name], config.candidates, config.ratio_init)


def last_uses(calls):
    """{table key: index of the last block that reads it}."""
    last = {}
    for i, call in enumerate(calls):
        for node in leaves(call.inputs):
            last[ref_key(node)] = i
    return last


def allocator(store, reusable, cache_dtype):
    """Output storage: a dying input of the same shape and dtype when there is one (written in place), else new."""
    def alloc(outs, num_rows):
        free, chosen = list(reusable), []
        for o in outs:
            shape, dtype = (num_rows, *o.shape[1:]), storage_dtype(o, cache_dtype)
            j = next((j for j, t in enumerate(free) if tuple(t.shape) == shape and t.dtype == dtype), None)
            chosen.append(free.pop(j) if j is not None else store.empty(shape, dtype))
        return chosen
    return alloc


def calibrate_block(block, layers, fp_weights, call, table, batched, targets, num_rows, config, generator, device,
                    progress=True, name="block"):
    """Train the quantized `layers` ({name: VQLinear} inside `block`) so that block(recorded inputs from `table`)
    matches `targets` (list of (M, ...) tensors); every layer is hard afterwards. Returns the block's stats but the
    final error. "before" is the argmax (= k-means nearest) assignment of the layers as handed in, i.e. the
    deployable model without calibration."""
    start = time.perf_counter()
    modules = list(layers.values())
    with argmax_assignment(modules):
        _, mse_before = sweep(block, call, table, batched, num_rows, device, targets=targets)
        w_before = [weight_mse(layer, fp_weights[n]) for n, layer in layers.items()]

    def loss_fn(idx):  # idx (B,) -> L_d: error of the block's outputs vs the FP targets on the minibatch
        return block_loss(call_block(block, call, table, batched, idx, device), [t[idx] for t in targets])

    info = train(modules, loss_fn, num_rows, config, generator, progress, desc=name)
    for layer in modules:
        layer.round_codebook_()  # calibrated = deployed: later blocks see the codebooks the artifact stores
    return {"mse_before": mse_before, "loss": info["loss"], "penalty": info["penalty"],
            "seconds": time.perf_counter() - start, "layers": layer_stats(layers, info, w_before, fp_weights)}


def _advance(tables, i, targets, q_outs, dying, store):
    """Block i's outputs join the tables; keys no later block reads leave them (their memory is released)."""
    for k, t in enumerate(targets):
        tables["fp"][out_key(i, k)] = t
    for k, t in enumerate(q_outs or []):
        tables["q"][out_key(i, k)] = t
    removed = [table.pop(key) for table in tables.values() for key in dying if key in table]
    alive = {id(t) for table in tables.values() for t in table.values()}
    released = set()
    for t in removed:
        if id(t) not in alive and id(t) not in released:
            store.release(t)
            released.add(id(t))


def calibrate_blockwise(blocks, teacher, cset, qlayers, config, tables, start, device, store, on_block_done,
                        cache_dtype, progress=True):
    """Calibrate blocks start..depth-1 in order, advancing `tables` ({"fp": {...}, "q": {...}}, slots in both).

    blocks: [(name, module)] of the quantized model; teacher: the FP model (same qualified names). After block i,
    `on_block_done(i, stats, tables)` sees what block i + 1 needs (the resumable state). Returns the stats.
    """
    fp_weights = {name: teacher.get_submodule(name).weight.detach() for name in qlayers}
    sequential = config.block_inputs == "quantized"
    last = last_uses(cset.calls)
    out = []
    for i in range(start, len(blocks)):
        name, block = blocks[i]
        call, fp, q = cset.calls[i], tables["fp"], tables.get("q")
        dying = [k for k in fp if last.get(k, -1) <= i]
        # the FP targets; in sequential mode nobody reads the FP inputs afterwards, so they may be overwritten
        reuse = [fp[k] for k in dying if k.startswith("o")] if sequential else []
        targets, _ = sweep(teacher.get_submodule(name), call, fp, cset.batched, cset.rows, device,
                           alloc=allocator(store, reuse, cache_dtype))
        inputs = q if sequential else fp
        soften(layers_of(qlayers, name), fp_weights, config)
        stats = calibrate_block(block, layers_of(qlayers, name), fp_weights, call, inputs, cset.batched, targets,
                                cset.rows, config, seeded_generator(config.seed, BLOCK_STREAM, i), device,
                                progress, name=name)
        alloc = allocator(store, [q[k] for k in dying], cache_dtype) if sequential else None
        q_outs, stats["mse_after"] = sweep(block, call, inputs, cset.batched, cset.rows, device, alloc=alloc,
                                           targets=targets)
        _advance(tables, i, targets, q_outs, dying, store)
        stats = {"block": i, "name": name, **stats}
        logger.info("block %d (%s): output MSE %.4g -> %.4g (%.1f s)", i, name, stats["mse_before"],
                    stats["mse_after"], stats["seconds"])
        for layer_name, s in stats["layers"].items():
            logger.info("  %s: selected %.3f before hardening (hard at iteration %s), weight MSE %.3g -> %.3g",
                        layer_name, s["selected"], s["hardened_at"], s["weight_mse_before"], s["weight_mse_after"])
        out.append(stats)
        on_block_done(i, stats, tables)
    return out
