"""`calibrate`: the zero-data calibration step of the quantize job, for any model an adapter describes.

1. Record (calib/capture.py): the FP teacher samples with its own sampler; the block calls at the kept steps
   become the calibration set (wiring + cached slots).
2. Walk the blocks (calib/blockwise.py) or train all at once (calib/joint.py), replaying the recorded calls.
Online calibration (calib/online.py, the authors' recipe) records nothing to train on: it updates at every
teacher step; a small recorded set measures its block errors before and after.
The state is saved to <out_dir>/calib_state/ after every block (joint, online: every few minutes), so calling
again with the same config resumes there; per-block stats are also appended to <out_dir>/calib_log.jsonl.
"""
import json
import logging
import os

import torch

from calib.blockwise import calibrate_blockwise, layer_stats, layers_of
from calib.cache import ActivationStore
from calib.capture import CalibrationSet, calib_steps, capture, step_filter
from calib.joint import calibrate_joint
from calib.metrics import chain_errors, weight_mse
from calib.online import calibrate_online
from calib.state import (
    config_hash,
    flatten_optimizer,
    layers_state,
    load_state,
    restore_layers,
    resume_point,
    save_state,
    tables_to_tensors,
    tensors_to_tables,
    unflatten_optimizer,
)
from calib.train import argmax_assignment
from utils.fileio import write_text_atomic

logger = logging.getLogger(__name__)

LOG_NAME = "calib_log.jsonl"
CACHE_DIR = "calib_cache"
CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TEACHER_BATCH = 64  # trajectories sampled at once by the teacher
# online calibration's error report: block errors on this many teacher samples x steps (not trained on)
ONLINE_EVAL_SAMPLES, ONLINE_EVAL_STEPS = 4, 10


def _append_log(path, records):
    """Append JSON lines; rewritten atomically (the log is small) so a kill never leaves half a line."""
    old = open(path).read() if os.path.exists(path) else ""
    write_text_atomic(path, old + "".join(json.dumps(r) + "\n" for r in records))


def teacher_plan(config, seed=None):
    """The teacher trajectories of `config`: calib_samples samples in batches (online: calib_samples trajectories
    of online_batch samples each, one batch per trajectory)."""
    from models.adapters import TeacherPlan

    seed = config.seed if seed is None else seed
    if config.calib == "online":
        return TeacherPlan(config.calib_samples * config.online_batch, config.steps, config.cfg_scale, seed,
                           config.online_batch)
    return TeacherPlan(config.calib_samples, config.steps, config.cfg_scale, seed, TEACHER_BATCH)


def record_calibration_set(teacher, adapter, config, device, store, progress=True):
    """Run the FP teacher and record the calibration set of `config` (calib_samples x calib_timesteps points,
    doubled by CFG)."""
    plan = teacher_plan(config)
    rows = plan.num_samples * len(calib_steps(plan.steps, config.calib_timesteps)) * adapter.rows_per_trajectory(plan)
    return capture(teacher, adapter.blocks(teacher), adapter.teacher_runs(teacher, plan, device),
                   step_filter(plan.steps, config.calib_timesteps), store, rows, CACHE_DTYPES[config.cache_dtype],
                   progress_total=plan.num_samples, progress=progress)


def _online(model, teacher, adapter, qlayers, config, out_dir, saved, store, digest, log_path, device, progress):
    """The authors' online recipe with its block-error report; resumable at trajectory boundaries."""
    import dataclasses

    blocks = adapter.blocks(model)
    modules = list(qlayers.values())
    eval_config = dataclasses.replace(config, calib="blockwise", calib_samples=ONLINE_EVAL_SAMPLES,
                                      calib_timesteps=min(ONLINE_EVAL_STEPS, config.steps))
    evalset = record_calibration_set(teacher, adapter, eval_config, device, store, progress=False)
    student_blocks, teacher_blocks = [m for _, m in blocks], [teacher.get_submodule(n) for n, _ in blocks]
    fp_weights = {name: teacher.get_submodule(name).weight.detach() for name in qlayers}
    resume = None
    if saved is None:
        write_text_atomic(log_path, "")
        with argmax_assignment(modules):
            before = {"mse": chain_errors(student_blocks, teacher_blocks, evalset, device),
                      "weight": [weight_mse(layer, fp_weights[n]) for n, layer in qlayers.items()]}
    else:
        meta, layers, _, train_tensors = saved
        if meta["next_block"] >= len(blocks):
            return meta["stats"]
        restore_layers(qlayers, layers)
        resume = {**meta["train_state"], "optimizer": unflatten_optimizer(meta["train_state"]["optimizer"],
                                                                          train_tensors)}
        before = resume["before"]
        logger.info("resuming online calibration after trajectory %d from %s", resume["trajectory"], out_dir)

    def on_checkpoint(snapshot):
        optimizer_meta, optimizer_tensors = flatten_optimizer(snapshot["optimizer"])
        save_state(out_dir, digest, 0, [], layers_state(qlayers, list(qlayers)), {},
                   train=({**snapshot, "optimizer": optimizer_meta, "before": before}, optimizer_tensors), wiring={})

    info = calibrate_online(model, teacher, adapter, qlayers, teacher_plan(config), config, device, progress, resume,
                            on_checkpoint)
    after = chain_errors(student_blocks, teacher_blocks, evalset, device)
    per_layer = layer_stats(qlayers, info, before["weight"], fp_weights)
    stats = [{"block": i, "name": name, "mse_before": before["mse"][i], "mse_after": after[i], "loss": info["loss"],
              "penalty": info["penalty"], "updates": info["updates"], "layers": layers_of(per_layer, name)}
             for i, (name, _) in enumerate(blocks)]
    for s in stats:
        logger.info("block %d (%s, online): output MSE %.4g -> %.4g", s["block"], s["name"], s["mse_before"],
                    s["mse_after"])
    save_state(out_dir, digest, len(blocks), stats, layers_state(qlayers, list(qlayers)), {}, wiring={})
    _append_log(log_path, [{"mode": "online", **s} for s in stats])
    return stats


def _table_names(config):
    return ("fp", "q") if config.calib == "blockwise" and config.block_inputs == "quantized" else ("fp",)


def calibrate(model, teacher, adapter, qlayers, config, out_dir, progress=True):
    """Calibrate the quantized layers `qlayers` ({name: VQLinear}, from vq.quantize_linears) of `model` in place.

    teacher: the full-precision model (same qualified names); adapter: their models.adapters.Adapter. config:
    calib.config.QuantizeConfig (method vq4dit or codebook; calib blockwise or joint). Returns the per-block
    stats (list of dicts); every layer is hard afterwards.
    """
    if config.method not in ("vq4dit", "codebook"):
        raise ValueError(f"calibrate runs for methods vq4dit and codebook, not {config.method!r}")
    device = next(model.parameters()).device
    model.eval()
    teacher.eval()
    if config.method == "codebook":  # PQF-style: fixed nearest assignments, only codebooks and biases train
        for layer in qlayers.values():
            layer.harden()
    digest = config_hash(config)
    log_path = os.path.join(out_dir, LOG_NAME)
    store = ActivationStore(None if config.max_cache_gb is None else int(config.max_cache_gb * 2**30),
                            config.cache_dir or os.path.join(out_dir, CACHE_DIR))
    saved = load_state(out_dir, digest)
    try:
        if config.calib == "online":
            return _online(model, teacher, adapter, qlayers, config, out_dir, saved, store, digest, log_path, device,
                           progress)
        return _offline(model, teacher, adapter, qlayers, config, out_dir, saved, store, digest, log_path, device,
                        progress)
    except KeyboardInterrupt:
        logger.warning("interrupted: rerun with the same config and output directory %s to resume at %s", out_dir,
                       resume_point(out_dir) or "the start")
        raise
    finally:
        store.close()


def _offline(model, teacher, adapter, qlayers, config, out_dir, saved, store, digest, log_path, device, progress):
    """Block-wise or joint calibration on a recorded calibration set; resumable per block (joint: mid-training)."""
    blocks = adapter.blocks(model)
    names = _table_names(config)
    if saved is None:
        write_text_atomic(log_path, "")  # the log mirrors the state: a fresh calibration starts a fresh log
        cset = record_calibration_set(teacher, adapter, config, device, store, progress)
        tables = {name: dict(cset.slots) for name in names}
        save_state(out_dir, digest, 0, [], {}, tables_to_tensors(tables), wiring=cset.wiring_json())
        start, stats, resume = 0, [], None
    else:
        meta, layers, acts, train_tensors = saved
        restore_layers(qlayers, layers)
        tables = tensors_to_tables({k: store.adopt(t) for k, t in acts.items()}, names)
        cset = CalibrationSet.from_json(meta["wiring"], {k: t for k, t in tables["fp"].items() if not
                                                        k.startswith("o")})
        start, stats, resume = meta["next_block"], meta["stats"], meta["train_state"]
        if resume is None:
            logger.info("resuming calibration at block %d of %d from %s", start, len(blocks), out_dir)
        else:
            resume = {**resume, "optimizer": unflatten_optimizer(resume["optimizer"], train_tensors)}
            logger.info("resuming joint calibration at iteration %d of %d from %s", resume["iteration"],
                        config.iters, out_dir)
    if start >= len(blocks):
        return stats
    return _run(model, teacher, blocks, cset, qlayers, config, tables, start, stats, resume, device, store, out_dir,
                digest, log_path, progress)


def _run(model, teacher, blocks, cset, qlayers, config, tables, start, stats, resume, device, store, out_dir, digest,
         log_path, progress):
    depth = len(blocks)

    def done_names(next_block):
        return [name for block_name, _ in blocks[:next_block] for name in layers_of(qlayers, block_name)]

    def on_block_done(i, block_stats, tables):
        stats.append(block_stats)
        save_state(out_dir, digest, i + 1, stats, layers_state(qlayers, done_names(i + 1)),
                   tables_to_tensors(tables) if i + 1 < depth else {})
        _append_log(log_path, [{"mode": "blockwise", **block_stats}])

    def on_checkpoint(snapshot):  # joint: every layer (soft or hard) and the optimizer, mid-training
        optimizer_meta, optimizer_tensors = flatten_optimizer(snapshot["optimizer"])
        save_state(out_dir, digest, 0, [], layers_state(qlayers, list(qlayers)), None,
                   train=({**snapshot, "optimizer": optimizer_meta}, optimizer_tensors))

    if config.calib == "joint":
        joint = calibrate_joint(blocks, teacher, cset, qlayers, config, device, progress, resume, on_checkpoint)
        stats.extend(joint)
        save_state(out_dir, digest, depth, stats, layers_state(qlayers, list(qlayers)), {})
        _append_log(log_path, [{"mode": "joint", **s} for s in joint])
    else:
        calibrate_blockwise(blocks, teacher, cset, qlayers, config, tables, start, device, store, on_block_done,
                            CACHE_DTYPES[config.cache_dtype], progress)
    return stats
