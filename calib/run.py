"""`calibrate`: the zero-data calibration step of the quantize pipeline, resumable per block."""
import json
import logging
import os

from calib.blockwise import block_layers, calibrate_blockwise
from calib.inputs import embed_inputs, teacher_inputs
from calib.joint import calibrate_joint
from calib.state import (
    config_hash,
    flatten_optimizer,
    layers_state,
    load_state,
    restore_layers,
    resume_point,
    save_state,
    unflatten_optimizer,
)
from utils.fileio import write_text_atomic

logger = logging.getLogger(__name__)

LOG_NAME = "calib_log.jsonl"


def _append_log(path, records):
    """Append JSON lines; rewritten atomically (the log is small) so a kill never leaves half a line."""
    old = open(path).read() if os.path.exists(path) else ""
    write_text_atomic(path, old + "".join(json.dumps(r) + "\n" for r in records))


def _fresh_acts(model, teacher, config, device):
    """Teacher trajectories -> block-0 inputs {"x_fp", "c"} (+ "x_q" for sequential block-wise)."""
    x, t, y = teacher_inputs(teacher, config.calib_samples, config.calib_timesteps, config.steps, config.cfg_scale,
                             config.seed, device)
    tokens, c = embed_inputs(model, x, t, y, device)
    acts = {"x_fp": tokens, "c": c}
    if config.calib == "blockwise" and config.block_inputs == "quantized":
        acts["x_q"] = tokens.clone()
    return acts


def calibrate(model, qlayers, config, out_dir, teacher=None, progress=True):
    """Calibrate the VQLinear layers `qlayers` ({name: layer}, from vq.quantize_linears) of `model` in place.

    config: calib.config.QuantizeConfig (method vq4dit or codebook; calib blockwise or joint). teacher:
    the full-precision model (None: reloaded from config.model / config.ckpt). The model's device is used.
    State is saved to <out_dir>/calib_state/ after every block (joint: every few minutes); calling again with
    the same config resumes there (a finished state returns at once). Per-block stats are also appended to
    <out_dir>/calib_log.jsonl. Returns the per-block stats (list of dicts). Every layer is hard afterwards.
    """
    if config.method not in ("vq4dit", "codebook"):
        raise ValueError(f"calibrate runs for methods vq4dit and codebook, not {config.method!r}")
    device = next(model.parameters()).device
    if teacher is None:
        from models.loading import load_dit

        teacher, _ = load_dit(config.model, config.ckpt, config.image_size, config.num_classes, device=device)
    model.eval()
    teacher.eval()
    if config.method == "codebook":  # PQF-style: fixed nearest assignments, only codebooks and biases train
        for layer in qlayers.values():
            layer.harden()
    depth = len(model.blocks)
    digest = config_hash(config)
    log_path = os.path.join(out_dir, LOG_NAME)
    saved = load_state(out_dir, digest)
    if saved is None:
        write_text_atomic(log_path, "")  # the log mirrors the state: a fresh calibration starts a fresh log
        acts = _fresh_acts(model, teacher, config, device)
        save_state(out_dir, digest, 0, [], {}, acts)
        start, stats, resume = 0, [], None
    else:
        meta, layers, acts, train_tensors = saved
        restore_layers(qlayers, layers)
        start, stats, resume = meta["next_block"], meta["stats"], meta["train_state"]
        if resume is None:
            logger.info("resuming calibration at block %d of %d from %s", start, depth, out_dir)
        else:
            resume = {**resume, "optimizer": unflatten_optimizer(resume["optimizer"], train_tensors)}
            logger.info("resuming joint calibration at iteration %d of %d from %s", resume["iteration"],
                        config.iters, out_dir)
    if start >= depth:
        return stats

    def done_names(next_block):
        return [name for i in range(next_block) for name in block_layers(qlayers, i)]

    def on_block_done(i, block_stats, acts):
        stats.append(block_stats)
        save_state(out_dir, digest, i + 1, stats, layers_state(qlayers, done_names(i + 1)),
                   acts if i + 1 < depth else {})
        _append_log(log_path, [{"mode": "blockwise", **block_stats}])

    def on_checkpoint(snapshot):  # joint: every layer (soft or hard) and the optimizer, mid-training
        optimizer_meta, optimizer_tensors = flatten_optimizer(snapshot["optimizer"])
        save_state(out_dir, digest, 0, [], layers_state(qlayers, list(qlayers)), None,
                   train=({**snapshot, "optimizer": optimizer_meta}, optimizer_tensors))

    try:
        if config.calib == "joint":
            joint = calibrate_joint(model, teacher, qlayers, acts["x_fp"], acts["c"], config, device, progress,
                                    resume, on_checkpoint)
            stats.extend(joint)
            save_state(out_dir, digest, depth, stats, layers_state(qlayers, list(qlayers)), {})
            _append_log(log_path, [{"mode": "joint", **s} for s in joint])
        else:
            calibrate_blockwise(model, teacher, qlayers, config, acts, start, device, on_block_done, progress)
    except KeyboardInterrupt:
        logger.warning("interrupted: rerun with the same config and output directory %s to resume at %s", out_dir,
                       resume_point(out_dir) or "the start")
        raise
    return stats
