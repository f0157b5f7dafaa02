"""Quantize a diffusers pipeline's transformer in memory, with the pipeline as its teacher, from a user's own script.

    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    quantized = quantize_transformer(pipe, wbits=2)  # pipe.transformer is now the quantized transformer
    quantized.save("sd3.5-medium-w2")  # the artifact quantize.py writes for the same config

The stages are quantize.py's own (jobs/quantize.py run_stages): the load stage takes the pipeline's transformer as it
is in memory instead of reading it, then codebooks, the teacher's recording and calibration, and the save stage on
demand.
"""
import contextlib
import copy
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from vq4dit.jobs.config import QuantizeConfig, load_config
from vq4dit.jobs.plan_sources import warn_preset_family
from vq4dit.load import guard_pipeline_save, guard_save_pretrained
from vq4dit.utils.device import resolve_device
from vq4dit.utils.errors import UserError
from vq4dit.vq.lora import enable_peft_lora

logger = logging.getLogger(__name__)


@dataclass
class QuantizedTransformer:
    """What quantize_transformer returns: the quantized transformer (pipe.transformer from then on, its Linears
    hard quantized layers, exactly as its artifact stores them), the resolved config, the artifact's model reference
    extras and the per-block calibration stats."""

    transformer: nn.Module
    config: QuantizeConfig
    extra: dict
    stats: list = field(default_factory=list)
    log: str | None = None  # the run's calibration log (calib_log.jsonl in work_dir; None: in a temporary one)

    def __repr__(self):  # the dataclass's would print the whole module tree, the config and every block's stats
        from vq4dit.vq.artifact import quantized_layers

        c = self.config
        quantizer = f"bits={c.codebooks.bits:g}" if c.codebooks.bits is not None else \
            f"wbits={c.codebooks.wbits}, dim={c.codebooks.dim}, k={c.codebooks.k}"
        return (f"QuantizedTransformer({type(self.transformer).__name__}, {len(quantized_layers(self.transformer))} "
                f"quantized layers, method={c.method!r}, {quantizer}, {len(self.stats)} calibrated blocks)")

    def save(self, out_dir, overwrite=False):
        """Write the artifact directory (model.safetensors, quant_config.json, config.yaml, README.md), as
        quantize.py writes it; vq4dit.load_transformer(out_dir) loads it back. A directory holding files vq4dit did
        not write is refused (UserError) unless `overwrite`, and even then they are kept (utils/outdir.py)."""
        from vq4dit.calib.checkpoints import CalibLog
        from vq4dit.jobs.quantize import announce_replacement, claim_artifact_dir, save
        from vq4dit.vq.artifact import quantized_layers

        if not isinstance(out_dir, (str, os.PathLike)):
            raise UserError(f"QuantizedTransformer.save: out_dir={out_dir!r}; give a directory path (str or "
                            "pathlib.Path)")
        if not isinstance(overwrite, bool):  # overwrite="no" would be true
            raise UserError(f"QuantizedTransformer.save: overwrite={overwrite!r}; give True or False")
        out_dir = os.fspath(out_dir)
        with claim_artifact_dir(out_dir, overwrite, "overwrite=True"):
            announce_replacement(out_dir, self.config)  # as quantize.py --out says it
            layers = {name: m for name, (m, _) in quantized_layers(self.transformer).items()}
            save(self.transformer, layers, self.extra, self.config, out_dir)
            there = CalibLog(out_dir)  # an earlier run's calibration log there would describe another model
            own = self.log is not None and os.path.isfile(self.log) and os.path.isfile(there.path)
            if not (own and os.path.samefile(there.path, self.log)):
                there.remove()


def quantize_transformer(pipe, config=None, work_dir=None, progress=True, **overrides):
    """Quantize `pipe.transformer`, calibrated against the transformer as it was (the teacher), sampled by the
    pipeline's class with the scheduler and text encoders of the directory or hub repo the pipeline was loaded from
    (pipe.name_or_path: a pipeline built in memory must be saved and loaded first); returns a QuantizedTransformer
    (.transformer, .save(out_dir)), which is pipe.transformer from then on. A calibrated method builds it on a copy
    (the pipeline's own transformer is its teacher), so a run that fails or is interrupted leaves the pipeline as
    it was, and the same call with the same work_dir resumes; k-means and RTN quantize the transformer in place.

    config: a YAML preset's path or a shipped preset's name (as quantize.py --config takes them), or a
        jobs.config.QuantizeConfig; None: quantize.py's defaults (the recipe's preset). overrides: flat keys as
        quantize.py's flags and config.yaml have them (wbits=2, iters=500, prompts="prompts.txt", device="cuda",
        ...). ckpt is the pipeline's source.
    work_dir: where the calibration keeps its resumable state, its log (calib_log.jsonl) and the activations past
        max_cache_gb; a rerun with the same work_dir and config resumes. None: a temporary directory.
    The transformer must be in float32 (quantize.py calibrates in it); it ends on the config's device.
    """
    from vq4dit.calib.checkpoints import resume_point
    from vq4dit.jobs.quantize import Run, load, run_stages
    from vq4dit.vq.artifact import quantized_layers

    enable_peft_lora()  # LoRAs load onto the quantized transformer as onto load_transformer's
    config = resolved_config(pipe, config, overrides)
    if config.stream == "on":  # auto: the transformer is on the device already, or not; either way not streamed
        raise UserError("stream='on': quantize_transformer quantizes a transformer already in memory in fp32; stream "
                        "with quantize.py --stream on, which loads the checkpoint on the host in its stored dtype")
    base = base_model(pipe, config.model.ckpt)
    with contextlib.ExitStack() as stack:
        directory = work_directory(work_dir) or stack.enter_context(tempfile.TemporaryDirectory(prefix="vq4dit-"))
        run = Run.open(config, directory, progress)
        base, include, extra, _ = load(config.model, config.device, loaded=base)
        teacher = None
        if run.method.calibrated:  # the student is a copy: a failed or interrupted run leaves the pipeline as it was
            teacher, base = base.model, dataclasses.replace(base, model=copy.deepcopy(base.model))
        try:
            _, stats = run_stages(base, include, run, teacher=teacher)
        except BaseException as e:
            if quantized_layers(pipe.transformer):  # a method that builds in place (k-means, RTN) stopped midway
                logger.error("quantize_transformer stopped with the %s's transformer partly quantized (--method %s "
                             "builds in place): load the pipeline again before another try", type(pipe).__name__,
                             config.method)
            elif isinstance(e, KeyboardInterrupt) and work_dir is not None:
                logger.warning("interrupted: the same call with work_dir=%r resumes at %s", directory,
                               resume_point(directory) or "the start")
            elif isinstance(e, KeyboardInterrupt):
                logger.warning("interrupted: the calibration state was in a temporary directory; give work_dir= "
                               "to resume an interrupted run")
            raise
        run.finish()
    pipe.transformer = base.model
    harden(base.model)
    guard_save_pretrained(base.model)  # diffusers' format cannot hold it: quantized.save(dir) is the way
    guard_pipeline_save(pipe, base.model)  # ... and pipe.save_pretrained refuses before writing the other parts
    logger.info("quantized %s with %s in memory", base.adapter.describe(base.model), config.method)
    log = run.log.path if work_dir is not None and run.method.calibrated else None  # published beside the state
    return QuantizedTransformer(base.model, config, extra, stats, log)


KEYWORDS = "quantize_transformer keywords"  # where a bad key came from, in its error


def work_directory(work_dir):
    """`work_dir` (str or os.PathLike) made to exist, before the pipeline is touched; None stays None."""
    if work_dir is None:
        return None
    if not isinstance(work_dir, (str, os.PathLike)):
        raise UserError(f"quantize_transformer: work_dir={work_dir!r}; give a directory path (str or pathlib.Path) "
                        "or None (a temporary directory)")
    try:
        os.makedirs(work_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"quantize_transformer: work_dir={os.fspath(work_dir)!r} cannot be a directory "
                        f"({e.strerror})") from None
    return os.fspath(work_dir)


def resolved_config(pipe, config, overrides):
    """The QuantizeConfig of the run: `config` (None: the defaults and recipe preset quantize.py starts from) with
    the flat `overrides` and ckpt set to the pipeline's source, as quantize.py --ckpt SOURCE would resolve it."""
    if not isinstance(getattr(pipe, "components", None), dict):  # a path, or pipe.transformer, given for the pipeline
        raise UserError(f"quantize_transformer: got a {type(pipe).__name__}; give the diffusers pipeline itself "
                        "(DiffusionPipeline.from_pretrained(DIR)), whose transformer it quantizes and whose text "
                        "encoders and scheduler its teacher runs")
    if "out" in overrides:
        raise UserError(f"quantize_transformer: out={overrides['out']!r}: the result is returned, not written; save "
                        "it with quantize_transformer(...).save(DIR)")
    source = getattr(pipe, "name_or_path", None)
    if not source:
        raise UserError(f"quantize_transformer: the {type(pipe).__name__} was not loaded with from_pretrained "
                        "(no name_or_path): its teacher runs need the directory or hub repo of its text encoders "
                        "and scheduler; save it with pipe.save_pretrained(DIR) and load it from DIR")
    given = overrides.get("ckpt", config.model.ckpt if isinstance(config, QuantizeConfig) else None)
    if given is not None and str(given) != str(source):
        raise UserError(f"quantize_transformer: ckpt={given!r}, but the pipeline was loaded from {source!r}; drop "
                        "ckpt (the pipeline is the model quantized)")
    if isinstance(overrides.get("prompts"), (list, tuple)):
        raise UserError(f"quantize_transformer: prompts={overrides['prompts']!r}; give the path of a prompts file "
                        "(one prompt per line), as quantize.py --prompts takes it")
    # paths as str, as the flags give them (prompts=Path("p.txt") was refused as not a str)
    values = {**{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items()},
              "ckpt": str(source)}
    if config is None or isinstance(config, (str, os.PathLike)):
        preset = None if config is None else os.fspath(config)
        warn_preset_family(preset, source)
        config = load_config(preset, values, KEYWORDS)
    elif isinstance(config, QuantizeConfig):
        config = config.replace(KEYWORDS, **values)
    else:
        raise UserError(f"quantize_transformer: config={config!r}; give a YAML preset's path, a shipped preset's "
                        "name (dit_xl_256_w2, ...), a jobs.config.QuantizeConfig, or None for the defaults")
    if config.model.backend == "vq4dit":
        raise UserError("quantize_transformer: backend='vq4dit' maps DiT weights into the project's DiT; a "
                        "pipeline's transformer is quantized in its diffusers form: use backend='auto'")
    dit_keys = [key for key in ("model", "image_size", "num_classes") if overrides.get(key) is not None]
    if dit_keys:  # the project DiT's settings (quantize.py's check names its flags, --ckpt and --backend)
        raise UserError(f"quantize_transformer: {', '.join(dit_keys)}: not used for a pipeline's transformer (its "
                        f"config sets the model and its sizes); drop {'it' if len(dit_keys) == 1 else 'them'}")
    resolve_device(config.device, "quantize_transformer: device")  # named as the API names it, before any work
    return config


def base_model(pipe, source):
    """The load stage's BaseModel for the pipeline's transformer as it is in memory, with the same model reference
    as quantize.py records for `source`."""
    from vq4dit.models.adapters import adapter_for
    from vq4dit.models.adapters.load import BaseModel, pipeline_reference
    from vq4dit.models.pipelines import resolve_pipeline
    from vq4dit.vq.artifact import quantized_layers

    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise UserError(f"quantize_transformer: {type(pipe).__name__} has no transformer to quantize (UNet "
                        "pipelines are not supported)")
    done = list(quantized_layers(transformer))
    if done:
        raise UserError(f"quantize_transformer: the {type(pipe).__name__}'s transformer is already quantized "
                        f"({len(done)} quantized layers, first {done[0]}); quantize a full-precision pipeline "
                        "(from_pretrained again), or save this one with quantized.save(DIR)")
    dtypes = sorted({str(p.dtype) for p in transformer.parameters() if p.is_floating_point()})
    if dtypes != [str(torch.float32)]:
        raise UserError(f"quantize_transformer: the transformer is in {', '.join(dtypes)}; load the pipeline in "
                        "float32 (from_pretrained's default, no torch_dtype): codebooks are fitted and calibrated "
                        "in float32, as quantize.py does")
    directory = resolve_pipeline(source)
    if directory is None:
        raise UserError(f"quantize_transformer: {source} (the pipeline's name_or_path) is not a diffusers pipeline "
                        "directory (no model_index.json)")
    return BaseModel(transformer.eval(), adapter_for(transformer), pipeline_reference(source, directory))


@torch.no_grad()
def harden(model):
    """Every quantized layer hard and exactly as its artifact stores it (vq/codecs.py, e.g. fp16-exact codebooks),
    so that the in-memory model, the saved artifact and the artifact loaded back compute the same."""
    from vq4dit.vq.artifact import quantized_layers

    for layer, codec in quantized_layers(model).values():
        if not layer.is_hard:
            layer.harden()
        codec.prepare(layer)
