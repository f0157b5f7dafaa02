"""The quantize job: load -> codebooks -> record -> calibrate -> save, for any model an adapter describes.

`quantize(config, out_dir)` is everything `quantize.py` does after parsing its arguments. Each stage takes the part
of the config it needs (jobs/config.py): the model spec to load, the method (jobs/methods.py) bound to the codebook
config to build the quantized layers, the teacher config to record, the calibration config to train, and the
CalibState (calib/state.py) that owns the output directory's resumable state.
"""
import copy
import logging
import time

from torch import nn

from jobs.config import QuantizeConfig
from jobs.methods import method_for
from models.adapters.base import linear_pattern, outside_blocks
from models.adapters.load import load_model
from models.prompts import read_prompts
from utils.device import device_memory, physical_memory, resolve_device
from utils.errors import UserError
from utils.fileio import check_dir_usable, free_bytes
from utils.precision import set_tf32
from vq.artifact import claim_artifact_dir

logger = logging.getLogger(__name__)


def quantize(config: QuantizeConfig, out_dir, progress=True, overwrite=False):
    """Run the configured method and write the artifact to out_dir; returns per-block calibration stats.
    overwrite: write beside files in out_dir that vq4dit did not write (kept), and delete a calibration state there
    that this run will not resume (else either is a UserError); out_dir is locked for the run (utils/outdir.py)."""
    from calib.state import CalibState, discard_state

    with claim_artifact_dir(out_dir, overwrite):
        if config.cache.cache_dir:
            check_dir_usable(config.cache.cache_dir, "--cache-dir")
        method = method_for(config.method, config.codebooks, config.seed)
        # a state left by another run must fail now, not after loading and k-means
        state = CalibState.for_config(out_dir, config, overwrite) if method.calibrated else None
        if state is None:
            discard_state(out_dir, overwrite, f"the resumable state of another run (--method {config.method} does not "
                          "calibrate)")
        start = time.time()
        base, include, extra = load(config.model, config.device)
        layers, stats = build_and_calibrate(base, include, method, config, state, progress)
        save(base.model, layers, extra, config, out_dir)
        if state is not None:
            state.remove()
        logger.info("quantized %s with %s in %.1f s -> %s", base.adapter.describe(base.model), config.method,
                    time.time() - start, out_dir)
        return stats


def load(spec, device, loaded=None):
    """The load stage for ModelSpec `spec`: (models.adapters.load.BaseModel, the regex of Linears to quantize, the
    artifact's model reference extras). `loaded`: a BaseModel already in memory (vq4dit.quantize_transformer: a
    pipeline's transformer), moved to `device` instead of loading spec's model."""
    prompts = read_prompts(spec.prompts) if spec.prompts else None  # a bad file fails before loading the model
    device = resolve_device(device)
    set_tf32(str(device).startswith("cuda"))  # fp32 storage, TF32 matmuls on CUDA (as the authors' code runs)
    if loaded is None:
        base = load_model(spec.model, spec.ckpt, spec.image_size, spec.num_classes, spec.backend, device)
    else:
        base = loaded
        base.model.to(device)
    extra = base.adapter.bind(base.extra, prompts, spec.height, spec.width, spec.num_frames)
    include = linear_pattern(base.adapter.quant_include(base.model), spec.include, spec.exclude)
    return base, include, extra


def build_and_calibrate(base, include, method, config, state, progress=True):
    """The codebook, record and calibrate stages: the Linears of BaseModel `base` matching `include` replaced in place
    by `method`'s quantized layers, calibrated against a copy of the model as it was (the teacher) when the method
    calibrates; returns ({name: quantized layer}, per-block calibration stats)."""
    outside = outside_blocks(base.adapter, base.model, include)
    if outside and method.calibrated:
        logger.warning("%d selected Linears lie outside the transformer blocks (first: %s): they are quantized but "
                       "not calibrated", len(outside), outside[0])
    if method.calibrated:
        check_calibration_fits(base, config, config.cache.cache_dir or state.cache_dir)
    teacher = copy.deepcopy(base.model) if method.calibrated else None  # the FP teacher, before Linears are replaced
    layers = method.build(base.model, include, config.seed, progress)
    stats = []
    if method.calibrated:
        from calib.problem import Problem

        if config.output_aware:
            logger.info("output-aware start: each block's codebooks are refit to its recorded inputs when "
                        "calibration reaches it (codebook_init %s)", config.codebooks.codebook_init)
        problem = Problem(base.model, teacher, base.adapter, layers, method.prepare, config.seed, progress,
                          needs_moments=config.output_aware)
        stats = record_and_calibrate(problem, config, state)
    return layers, stats


def check_calibration_fits(base, config, cache_dir):
    """Refuse, before k-means, teacher data that cannot fit this machine: each row (offline: the recorded set's
    trajectories x kept steps x CFG rows; online: one trajectory batch's CFG rows, on the model's device) holds at
    least one token of the first block's input (cache dtype offline, fp32 online), against physical memory plus the
    free disk under `cache_dir` (online: the device's memory). A lower bound: what it lets pass may still fill the
    disk, which the activation cache reports when it reserves a file; without it a count like 10^12 met the
    allocator with a traceback."""
    from calib.cache import dtype_bytes
    from calib.capture import calib_steps
    from calib.teacher import teacher_plan

    teacher = config.teacher
    _, block = base.adapter.blocks(base.model)[0]
    width = next(m.in_features for m in block.modules() if isinstance(m, nn.Linear))
    online = config.calibration.calib == "online"
    plan = teacher_plan(teacher, config.seed, online)
    cfg_rows = base.adapter.rows_per_trajectory(plan)
    if online:
        flag, count, rows = "--online-batch", teacher.online_batch, plan.batch_size * cfg_rows
        device = next(base.model.parameters()).device
        needed, room, where = rows * width * 4, device_memory(device), f"the memory of {device}"
    else:
        flag, count = "--calib-samples", teacher.calib_samples
        rows = plan.num_samples * len(calib_steps(teacher.steps, teacher.calib_timesteps)) * cfg_rows
        needed, room = rows * width * dtype_bytes(config.cache.dtype), physical_memory() + free_bytes(cache_dir)
        where = f"this machine's memory and the free disk under {cache_dir}"
    if needed > room:
        raise UserError(f"{flag} {count}: {rows:,} rows need at least {needed / 2**30:,.1f} GiB, more than {where} "
                        f"({room / 2**30:,.1f} GiB); even by this lower bound at most {count * room // needed:,} fit")


def record_and_calibrate(problem, config, state):
    """The record and calibrate stages (calib/calibrate.py) of calib.problem.Problem `problem` with QuantizeConfig
    `config`, saving to CalibState `state`, with the activation cache open between them; returns per-block stats."""
    from calib.cache import ActivationStore
    from calib.calibrate import calibrate, record

    cache = config.cache
    max_bytes = None if cache.max_cache_gb is None else int(cache.max_cache_gb * 2**30)
    with ActivationStore(max_bytes, cache.cache_dir or state.cache_dir, cache.dtype) as store:
        data = record(problem, config.teacher, config.calibration, store, state)
        return calibrate(problem, data, config.calibration, state)


def save(model, layers, extra, config, out_dir):
    """The save stage: every layer hard, then the artifact (vq/artifact.py) with its model reference and config."""
    from vq import save_quantized
    from vq.modelref import reference

    for layer in layers.values():
        if not layer.is_hard:
            layer.harden()
    save_quantized(model, reference(model, **extra), out_dir, config.to_dict())
