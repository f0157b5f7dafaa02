"""The quantize job: load -> build codebooks -> record -> calibrate -> save, for any model an adapter describes.

`quantize(config, out_dir)` is everything `quantize.py` does after parsing its arguments; the Python API
(vq4dit.quantize_transformer) runs the same stages on a transformer already in memory (`run_stages`). Each stage
takes the part of the config it needs (jobs/config.py): the model spec to load, the method (jobs/methods.py) bound
to the codebook config to build the quantized layers, the calibration mode (calib/modes.py) with the teacher config
to record and the calibration config to train, and the Run's checkpoint store (calib/checkpoints.py), opened with
the run's key (jobs/runkey.py), that makes the calibration resumable. Under torchrun every process runs the stages
on its share of the data (docs/usage.md "Several processes"); rank 0 claims the directory and writes the artifact.
"""
import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass

from torch import nn

from vq4dit.calib.cache import ActivationStore, dtype_bytes
from vq4dit.calib.checkpoints import (
    CACHE_DIR,
    LOG_NAME,
    STATE_DIR,
    CalibLog,
    CheckpointStore,
    discard_state,
    resume_point,
)
from vq4dit.calib.modes import CalibMode, mode_for
from vq4dit.calib.modes import calibrate as calibrate_mode
from vq4dit.calib.problem import Problem
from vq4dit.jobs.allocation import allocate
from vq4dit.jobs.config import ModelSpec, QuantizeConfig
from vq4dit.jobs.fit import fit_to_device
from vq4dit.jobs.methods import Method, method_for
from vq4dit.jobs.preflight import check_inputs
from vq4dit.jobs.runkey import RunKey
from vq4dit.jobs.streaming import StreamedModel
from vq4dit.models.adapters.base import outside_blocks, selected_pattern
from vq4dit.models.adapters.load import load_model
from vq4dit.models.offload import HostBlocks
from vq4dit.models.prompts import read_prompts
from vq4dit.utils import distributed
from vq4dit.utils.device import device_memory, physical_memory, resolve_device
from vq4dit.utils.errors import UserError
from vq4dit.utils.fileio import free_bytes
from vq4dit.utils.outdir import claim_out_dir
from vq4dit.utils.precision import set_tf32
from vq4dit.utils.yamlfile import read_yaml
from vq4dit.vq import save_quantized
from vq4dit.vq.artifact import (
    ARTIFACT_FILES,
    ARTIFACT_TOOL,
    CONFIG_FILE,
    check_config_file,
    check_model_file,
    read_quant_config,
)
from vq4dit.vq.modelref import reference

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One quantize run: its config, the method and calibration mode it names, the checkpoint store and log of its
    work directory (None when the method does not calibrate), and whether bars are shown."""

    config: QuantizeConfig
    method: Method
    mode: CalibMode
    checkpoints: CheckpointStore | None
    log: CalibLog
    progress: bool = True

    @classmethod
    def open(cls, config, work_dir, progress=True, overwrite=False):
        """A run working in `work_dir`; a checkpoint left there by another run fails now, before loading and k-means
        (overwrite: it is deleted instead)."""
        method = method_for(config.method, config.codebooks, config.seed)
        checkpoints = CheckpointStore(work_dir, RunKey.of(config), overwrite) if method.calibrated else None
        if checkpoints is None and distributed.rank() == 0:  # under torchrun rank 0 speaks for the directory
            discard_state(work_dir, overwrite, f"the resumable state of another run (--method {config.method} does "
                          "not calibrate)")
        return cls(config, method, mode_for(config.calibration.calib), checkpoints, CalibLog(work_dir), progress)

    @property
    def cache_dir(self):
        return self.config.cache.cache_dir or self.checkpoints.cache_dir

    def finish(self):
        """The result is safe (written, or held by the caller): the calibration log moves beside it and the
        checkpoints go (GiBs of activations); a method that does not calibrate removes an earlier run's calibration
        log, which would describe another model."""
        if self.checkpoints is not None:
            self.log.publish()
            self.checkpoints.remove()
        else:
            self.log.remove()


def quantize(config: QuantizeConfig, out_dir, progress=True, overwrite=False):
    """Run the configured method and write the artifact to out_dir; returns per-block calibration stats.
    overwrite: write beside files in out_dir that vq4dit did not write (kept), and delete a calibration state there
    that this run will not resume (else either is a UserError); out_dir is locked for the run (utils/outdir.py)."""
    check_inputs(config)
    device = distributed.init(resolve_device(config.device))  # under torchrun: join the group, pin this rank's GPU
    lead = distributed.rank() == 0
    if distributed.active():
        check_processes(config)
    with claim_artifact_dir(out_dir, overwrite) if lead else contextlib.nullcontext():
        if lead:
            announce_replacement(out_dir, config)
        config = fit_to_device(config, device)  # --stream auto and the micro-batch, from the memory plan
        run = Run.open(config, out_dir, progress and lead, overwrite)
        start = time.time()
        stream = config.stream == "on"
        base, include, extra, offload = load(config.model, device, stream=stream)
        layers, stats = run_stages(base, include, run, offload)
        if lead:  # every rank holds the same layers: rank 0 writes the one artifact
            save(base.model, layers, extra, config, out_dir)
            run.finish()
        distributed.shutdown()
        logger.info("quantized %s with %s in %.1f s -> %s", base.adapter.describe(base.model), config.method,
                    time.time() - start, out_dir)
        return stats


def made_by_this_run(out_dir, config):
    """Whether out_dir holds a complete artifact whose recorded run_key is this run's: every config field that can
    change the result, and the checkpoint and prompts file by content (jobs.runkey.RunKey), with its model file and
    config.yaml the ones quant_config.json records (a damaged one is made again, with a warning). An artifact saved
    before run keys were recorded, or a partial one, is not."""
    try:
        quant = read_quant_config(out_dir)
    except UserError:
        return False
    if quant.get("run_key") != RunKey.of(config).digest():
        return False
    try:
        check_model_file(out_dir, quant)
        check_config_file(out_dir, quant)
    except UserError as e:
        logger.warning("%s holds this run's artifact, damaged (%s): quantizing again", out_dir, e)
        return False
    return True


def check_processes(config):
    """Under torchrun: refuse what data-parallel calibration does not split (docs/usage.md "Several processes")."""
    calibration, count = config.calibration, distributed.size()
    if calibration.calib != "blockwise":
        raise UserError(f"--calib {calibration.calib}: under torchrun ({count} processes) only blockwise "
                        "calibration is split between processes; run it in one process")


SHOWN_CHANGES = 4  # config differences named when a run replaces an artifact, these keys first:
KEYS_FIRST = ("ckpt", "model", "method", "recipe", "bits", "wbits", "dim", "codebook_size", "seed")


def claim_artifact_dir(out_dir, overwrite=False, flag="--overwrite"):
    """utils.outdir.claim_out_dir for an artifact directory: its own entries are the artifact's files and a
    calibration's (calib/checkpoints.py); an unmarked directory holding an artifact or calibration state of a run from
    before markers existed is ours too (it is replaced, or resumed)."""
    def earlier(directory):
        if resume_point(directory) is not None:
            return True
        try:
            return bool(read_quant_config(directory))
        except UserError:
            return False

    return claim_out_dir(out_dir, (*ARTIFACT_FILES, STATE_DIR, LOG_NAME, CACHE_DIR), overwrite, flag, earlier,
                         ARTIFACT_TOOL)


def run_stages(base, include, run, offload=None, teacher=None):
    """The build, record and calibrate stages of Run `run` on the loaded BaseModel `base` (its Linears matching
    `include`): ({name: quantized layer}, per-block calibration stats; none when the method does not calibrate).
    offload: the models.offload.HostBlocks of a streamed run (load), which streams base.model from the host in its
    stored dtype (jobs/streaming.py); base.model becomes the student. teacher: the FP model base.model is a copy of,
    kept as the teacher instead of a new copy (build_codebooks)."""
    problem, layers = build_codebooks(base, include, run, offload, teacher)
    if problem is None:
        return layers, []
    try:
        return layers, record_and_calibrate(problem, run)
    finally:
        if problem.offload is not None:  # the streamed teacher's hooks go, and with them its last references
            problem.offload.close()


def record_and_calibrate(problem, run):
    """The record and calibrate stages of calib.problem.Problem `problem` in Run `run`, with the activation cache
    open between them; returns the per-block stats."""
    cache = run.config.cache
    max_bytes = None if cache.max_cache_gb is None else int(cache.max_cache_gb * 2**30)
    with ActivationStore(max_bytes, run.cache_dir, cache.dtype) as store:
        data = record(problem, run, store)
        return calibrate(problem, data, run)


def load(spec, device, loaded=None, stream=False):
    """The load stage for ModelSpec `spec`: (models.adapters.load.BaseModel, the regex of Linears to quantize, the
    artifact's model reference extras, the HostBlocks of a streamed run or None). `loaded`: a BaseModel already in
    memory (vq4dit.quantize_transformer: a pipeline's transformer), moved to `device` instead of loading spec's
    model; stream: loaded on the host in the checkpoint's dtypes, its blocks streamed through `device` by a
    models.offload.HostBlocks from here on, so that a pipeline probe finding the blocks (the generic adapter's)
    runs it as the fp32 model (jobs/streaming.py builds the student)."""
    prompts = read_prompts(spec.prompts) if spec.prompts else None  # a bad file fails before loading the model
    device = resolve_device(device)
    set_tf32(str(device).startswith("cuda"))  # fp32 storage, TF32 matmuls on CUDA (as the authors' code runs)
    if loaded is None:
        base = load_model(spec.model, spec.ckpt, spec.image_size, spec.num_classes, spec.backend, device,
                          stored_dtype=stream)
    else:
        base = loaded
        base.model.to(device)
    offload = HostBlocks(base.model, base.adapter.stream_blocks(base.model), device) if stream else None
    extra = base.adapter.bind(base.extra, prompts, spec.height, spec.width, spec.num_frames)
    include = selected_pattern(base.adapter, base.model, spec.include, spec.exclude)
    return base, include, extra, offload


def build_codebooks(base, include, run, offload=None, teacher=None):
    """The codebook stage: the Linears of BaseModel `base` matching `include` replaced in place by the method's
    quantized layers. When the method calibrates, the model as it was is kept as the teacher (a copy, made before
    the Linears are replaced; or `teacher`, the model base.model was copied from: vq4dit.quantize_transformer keeps
    the pipeline's own until the run succeeds) and a calib.problem.Problem is returned with the layers; else None.
    offload: the HostBlocks streaming base.model from the host (None: not streamed); the quantized student is then
    built block by block on the device and becomes base.model, and the host model is the teacher
    (jobs/streaming.py)."""
    method, config = run.method, run.config
    outside = outside_blocks(base.adapter, base.model, include)
    if outside and method.calibrated:
        logger.warning("%d selected Linears lie outside the transformer blocks (first: %s): they are quantized but "
                       "not calibrated", len(outside), outside[0])
    if method.calibrated:
        check_calibration_fits(base, run.mode, config, run.cache_dir)
    settings, streamed = None, None
    if offload is not None:
        logger.info("streaming (--stream %s): the model stays on the host as stored, its blocks visit %s one at a "
                    "time", config.stream, offload.device)
        streamed = StreamedModel.open(base.model, base.adapter, offload, method.calibrated)
    if config.codebooks.bits is not None:  # per-layer settings under the --bits budget (jobs/allocation.py)
        settings = allocate(base.model, base.adapter, include, config, offload, run.progress).settings
    if streamed is not None:
        base.model, teacher, offload, layers = streamed.build(include, method, config.seed, settings, run.progress)
    else:
        if teacher is None and method.calibrated:
            teacher = copy.deepcopy(base.model)  # the FP teacher, before the Linears go
        layers = method.build(base.model, include, config.seed, run.progress, settings)
    if not method.calibrated:
        return None, layers
    if config.output_aware:
        logger.info("output-aware start: each block's codebooks are refit to its recorded inputs when calibration "
                    "reaches it (codebook_init %s)", config.codebooks.codebook_init)
    return Problem(base.model, teacher, base.adapter, layers, method.prepare, config.seed, run.progress,
                   needs_moments=config.output_aware, offload=offload), layers


def check_calibration_fits(base, mode, config, cache_dir):
    """Refuse, before k-means, teacher data that cannot fit this machine: the rows CalibMode `mode` records (its
    Footprint) each hold at least one token of the first block's input, against physical memory plus the free
    disk under `cache_dir` (a mode that keeps them on the model's device: that device's memory). A lower bound:
    what it lets pass may still fill the disk, which the activation cache reports when it reserves a file; without
    it a count like 10^12 met the allocator with a traceback."""
    _, block = base.adapter.blocks(base.model)[0]
    width = next(m.in_features for m in block.modules() if isinstance(m, nn.Linear))
    plan = mode.teacher_plan(config.teacher, config.seed)
    need = mode.footprint(config.teacher, plan, base.adapter.rows_per_trajectory(plan), dtype_bytes(config.cache.dtype))
    needed = need.rows * width * need.value_bytes
    if need.on_device:
        device = next(base.model.parameters()).device
        room, where = device_memory(device), f"the memory of {device}"
    else:
        room = physical_memory() + free_bytes(cache_dir)
        where = f"this machine's memory and the free disk under {cache_dir}"
    if needed > room:
        raise UserError(f"{need.flag} {need.count}: {need.rows:,} rows need at least {needed / 2**30:,.1f} GiB, more "
                        f"than {where} ({room / 2**30:,.1f} GiB); even by this lower bound at most "
                        f"{need.count * room // needed:,} fit")


def record(problem, run, store):
    """The record stage: the teacher data of Run `run`'s mode (calib.modes.CalibData), recorded into the activation
    store `store` from the teacher of calib.problem.Problem `problem`, or read back from the last checkpoint."""
    config = run.config
    return run.mode.record(problem, config.teacher, config.calibration, store, run.checkpoints, run.log)


def calibrate(problem, data, run):
    """The calibrate stage: the quantized layers of `problem` trained in place on `data` by Run `run`'s mode (every
    layer hard afterwards); returns the per-block stats."""
    return calibrate_mode(problem, data, run.mode, run.config.calibration, run.checkpoints, run.log)


def save(model, layers, extra, config, out_dir):
    """The save stage: every layer hard, then the artifact (vq/artifact.py) with its model reference and config."""
    for layer in layers.values():
        if not layer.is_hard:
            layer.harden()
    save_quantized(model, reference(model, **extra), out_dir, config.recorded(), RunKey.of(config).digest())


def announce_replacement(out_dir, config):
    """Log what a run replaces: a complete artifact already in `out_dir`, and how its config differs (a rerun with
    another seed or method replaces it; the marker's rules let it, as the artifact is vq4dit's own)."""
    try:
        read_quant_config(out_dir)
        before = read_yaml(os.path.join(out_dir, CONFIG_FILE))
    except UserError:
        return
    # config.yaml leaves out the default DiT name of a pipeline's run (QuantizeConfig.recorded): compare it filled in
    before, now = {"model": ModelSpec.model, **before}, config.to_dict()
    first = {key: i for i, key in enumerate(KEYS_FIRST)}
    keys = sorted(set(before) | set(now), key=lambda k: (first.get(k, len(first)), k))
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in keys if before.get(key) != now.get(key)]
    if changed:
        logger.warning("%s: replacing the artifact there, made with another config (%s%s)", out_dir,
                       "; ".join(changed[:SHOWN_CHANGES]), f"; {len(changed) - SHOWN_CHANGES} more"
                       if len(changed) > SHOWN_CHANGES else "")
    else:
        logger.info("%s: replacing the artifact there, made with the same config", out_dir)
