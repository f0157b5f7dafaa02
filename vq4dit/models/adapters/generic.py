"""Any diffusers transformer without a dedicated adapter: blocks found by structure, the pipeline's own __call__ as
teacher and sampler.

Blocks are the transformer's nn.ModuleLists of repeated blocks: lists among its children (or among the children of
a child nn.ModuleDict) whose items are all one class, each holding two or more Linears. Lists nested deeper (a text
refiner inside an embedder, an attention's to_out) are not blocks. Every Linear inside the blocks is quantized;
embedders, norms and the final projection stay in full precision. The blocks are ordered as they are called, found
by a probe: the pipeline samples one prompt for two steps with a hook on every block, and the first transformer
call gives the order (lists may interleave; Flux-like models call the dual-stream list, then the single-stream
one). Blocks the probe never calls are left out and stay in full precision.

Many pipelines guide with two transformer calls per sampler step, one for the prompt and one for the negative
prompt (Wan, Qwen-Image, Chroma, Lumina2, HunyuanVideo); calibration counts one call per step. The teacher's
pipeline therefore holds the transformer behind `FirstCallPerStep`: the first call at each timestep goes through
the module (the recording's hooks see it), further calls at the same timestep run its forward directly, unseen.
Such a pipeline's calibration points are its conditional inputs along guided trajectories; a pipeline that
batches both (SANA, CogVideoX, LTX-Video) records both halves. The probe counts the rows per trajectory of the
calls seen, with and without guidance.

The teacher is the pipeline's own __call__ on prompts (output_type="latent"), trajectory i from a generator seeded
by (seed, i), with whatever text encoders the pipeline has: on the CPU, computing in fp32 one layer at a time from
their weights as stored (on a GPU their inputs are moved to the CPU and their outputs back), held from the probe to
the teacher's last run and released before calibration; the VAE stays on the CPU, unused. A pipeline with an
encode_prompt method has every teacher batch's prompts encoded before the first runs and padded to one token length;
under torchrun rank 0 alone holds the text encoders: it probes for every process and encodes every process's batches
(encode_replay.py). Sampling goes through the whole pipeline; a video pipeline (num_frames) draws uint8 frames (N,
F, H, W, 3).
"""
import gc
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.models.adapters.encode_replay import replayable, replayed_runs
from vq4dit.models.adapters.pipeline_runs import (
    FirstCallPerStep,
    call_order,
    first_call,
    meta_pipeline,
    run_probe,
    teacher_pipeline,
)
from vq4dit.models.adapters.t2i import TextToImageAdapter
from vq4dit.models.pipelines import read_index
from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError, error_detail

logger = logging.getLogger(__name__)

MIN_LINEARS = 2  # a block holds attention and MLP Linears; a list of single projections is an embedder
PROBE_PROMPT = "a photo"
PROBE_STEPS = 2


@dataclass(frozen=True)
class Probe:
    order: list  # block names in the order the first transformer call reached them
    rows: int  # transformer batch rows per trajectory
    calls_per_step: float  # None when unknown (the meta-device probe stops after the first call)


def block_lists(model):
    """[(qualified name, nn.ModuleList)] of `model`'s lists of repeated blocks (see the module docstring)."""
    candidates = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            candidates.append((name, child))
        elif isinstance(child, nn.ModuleDict):
            candidates += [(f"{name}.{key}", items) for key, items in child.items() if isinstance(items, nn.ModuleList)]
    return [(name, items) for name, items in candidates if len(items) and len({type(b) for b in items}) == 1
            and all(sum(isinstance(m, nn.Linear) for m in b.modules()) >= MIN_LINEARS for b in items)]


def candidates(model):
    """[(qualified name, block)] of every block in `model`'s block lists, list by list."""
    return [(f"{name}.{i}", block) for name, items in block_lists(model) for i, block in enumerate(items)]


def structure(model):
    """A short account of `model`'s children, for the error of a model whose blocks cannot be found."""
    def kind(child):
        if isinstance(child, nn.ModuleList) and len(child):
            return f"ModuleList of {len(child)} {'/'.join(sorted({type(b).__name__ for b in child}))}"
        return type(child).__name__

    children = list(model.named_children())
    listed = ", ".join(f"{name} ({kind(child)})" for name, child in children[:10])
    return listed + (f" and {len(children) - 10} more" if len(children) > 10 else "") or "no child modules"


def _rows(args, kwargs):
    """Batch rows of a transformer call: the leading dimension of hidden_states, else of its first tensor."""
    first = kwargs.get("hidden_states")
    if first is None:
        first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.dim() > 0), None)
    if first is None:
        raise UserError("the transformer's call has no batched tensor argument; cannot count its batch rows")
    return first.shape[0]


def _default(pipe, name):
    """The pipeline's default for size keyword `name` (its __call__ default, else default_sample_size x VAE factor
    for height and width), or None."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    if parameter is not None and isinstance(parameter.default, int):
        return parameter.default
    if name in ("height", "width") and isinstance(getattr(pipe, "default_sample_size", None), int):
        return pipe.default_sample_size * pipe.vae_scale_factor
    return None


class GenericAdapter(TextToImageAdapter):
    family = "generic"
    video = True  # num_frames is accepted when the pipeline's __call__ takes it
    encoders_by_layer = True  # the teacher pipeline's text encoders (pipeline_runs.teacher_pipeline)

    def __init__(self):
        super().__init__()
        self.names = None  # block names in call order, once found
        self.probes = {}  # guidance scale -> Probe
        self.subject = None  # the model the probes run
        self.pipe = None  # the teacher pipeline, from the first probe to the teacher's last run

    # --- blocks ---------------------------------------------------------------------------------------------------
    def blocks(self, model):
        if self.names is None:
            self.names = self._find(model)
        return [(name, model.get_submodule(name)) for name in self.names]

    def _find(self, model):
        found = candidates(model)
        if not found:
            raise UserError(f"{type(model).__name__}: no transformer blocks found (nn.ModuleLists of one block class "
                            f"with >= {MIN_LINEARS} Linears each, among its children); it has: {structure(model)}")
        if self.source is None or next(model.parameters()).is_meta:
            return [name for name, _ in found]  # structure only: the lists in the order the model declares them
        self.subject = model
        order = self.probe(model, 1.0).order
        left = [name for name, _ in found if name not in order]
        if left:
            logger.warning("%d blocks are never called by the pipeline and stay in full precision: %s", len(left),
                           ", ".join(left[:4]) + (" ..." if len(left) > 4 else ""))
        return order

    def stream_blocks(self, model):
        return candidates(model)  # blocks() probes the pipeline, which runs the model

    def quant_include(self, model):
        names = "|".join(name.replace(".", r"\.") for name, _ in self.blocks(model))
        return rf"^(?:{names})\."

    @property
    def encodes_once(self):
        """Whether under torchrun rank 0 alone holds the text encoders: the pipeline encodes through encode_prompt,
        which rank 0 runs for every process (encode_replay.py); else every process holds them while the teacher
        runs."""
        if self.source is None:
            return False
        import diffusers

        return replayable(getattr(diffusers, read_index(self._directory(self.source))["_class_name"], None))

    # --- probe ----------------------------------------------------------------------------------------------------
    def probe(self, model, cfg_scale):
        """What one trajectory of the pipeline does at guidance scale `cfg_scale` (see the module docstring). Under
        torchrun, when rank 0 alone holds the text encoders (encodes_once), rank 0 probes and tells the others."""
        if cfg_scale not in self.probes:
            shared = distributed.active() and self.encodes_once
            found = self._probe(model, cfg_scale) if distributed.rank() == 0 or not shared else None
            if shared:
                found = Probe(*distributed.broadcast_nested(None if found is None else
                                                            (found.order, found.rows, found.calls_per_step), 0))
            self.probes[cfg_scale] = found
        return self.probes[cfg_scale]

    def _probe(self, model, cfg_scale):
        pipe = self.pipeline(model)
        blocks = self.blocks(model) if self.names else candidates(model)
        calls, order = run_probe(pipe, model, blocks, self._call(pipe, [PROBE_PROMPT], cfg_scale, PROBE_STEPS))
        if not calls:
            raise UserError(f"the {type(pipe).__name__} pipeline never called its transformer")
        probe = Probe(order, _rows(*calls[0]), len(calls) / PROBE_STEPS)
        logger.info("probe at guidance %.3g: %d blocks called, %d rows per trajectory, %.3g calls per step",
                    cfg_scale, len(order), probe.rows, probe.calls_per_step)
        return probe

    def pipeline(self, model):
        """The teacher pipeline, loaded once, with `model` as its transformer."""
        if self.pipe is None:
            encoders = distributed.rank() == 0 or not self.encodes_once  # elsewhere rank 0's encodings are replayed
            self.pipe = teacher_pipeline(self._directory(self.source), model, text_encoders=encoders)
        self.pipe.__dict__["transformer"] = FirstCallPerStep(model)  # no re-registration: the proxy is no module
        return self.pipe

    def _call(self, pipe, prompts, cfg_scale, steps):
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return dict(prompt=list(prompts), guidance_scale=cfg_scale, num_inference_steps=steps,
                    generator=generators, output_type="latent", **self.size_options(pipe, self.height, self.width,
                                                                                    self.num_frames))

    def size_options(self, pipe, height, width, num_frames):
        """The given size keywords of the pipeline's __call__ (None: the pipeline's default); a given size is drawn
        as asked, not binned to the nearest trained resolution (PixArt and SANA pipelines would)."""
        parameters = inspect.signature(pipe.__call__).parameters
        if num_frames is not None and "num_frames" not in parameters:
            raise UserError(f"num_frames={num_frames}: {type(pipe).__name__} draws images, not videos")
        fixed = [f"{k}={v}" for k, v in (("height", height), ("width", width)) if v is not None and k not in parameters]
        if fixed:
            raise UserError(f"{', '.join(fixed)}: {type(pipe).__name__} takes no size; drop it")
        size = {k: v for k, v in (("height", height), ("width", width), ("num_frames", num_frames)) if v is not None}
        if (height or width) and "use_resolution_binning" in parameters:
            size["use_resolution_binning"] = False
        return size

    # --- teacher --------------------------------------------------------------------------------------------------
    def rows_per_trajectory(self, plan):
        if self.subject is None and not self.probes:
            raise RuntimeError("blocks() finds the pipeline's rows per trajectory; call it first")
        return self.probe(self.subject, plan.cfg_scale).rows

    def teacher_runs(self, model, plan, device):
        runs = super().teacher_runs(model, plan, device)
        if self.encodes_once:  # every batch encoded first, at one token length (encode_replay.py)
            runs = list(runs)  # every batch's run, the teacher pipeline loaded
            runs = replayed_runs(self.pipe, model, runs)
        yield from runs
        self.pipe = None
        gc.collect()
        logger.info("teacher done: text encoders released")

    def teacher_pipeline(self, model, directory, prompts, plan, device):
        probe = self.probe(model, plan.cfg_scale)
        pipe = self.pipeline(model)
        if probe.calls_per_step != 1:
            raise UserError(f"{type(pipe).__name__}: {probe.calls_per_step:g} transformer calls per sampler step at "
                            f"cfg_scale={plan.cfg_scale:g} reach the recording (its calls pass no `timestep` to tell "
                            "the steps apart); calibration needs one call per step")
        return pipe, lambda rows: {"prompt": [prompts[r] for r in rows]}, self.size_options(
            pipe, self.height, self.width, self.num_frames)

    # --- sampling -------------------------------------------------------------------------------------------------
    def sample_size(self, model, pipe, directory, recorded, settings):
        frames = settings.num_frames or recorded.get("num_frames")
        size = self.size_options(pipe, settings.height or recorded.get("height"),
                                 settings.width or recorded.get("width"), frames)
        self.video = "num_frames" in inspect.signature(pipe.__call__).parameters
        shape = tuple(size.get(k) or _default(pipe, k) for k in ("num_frames", "height", "width")[not self.video:])
        return size, shape

    # --- memory plan ----------------------------------------------------------------------------------------------
    def plan_call(self, model, plan, vae_factor, size, tokens, rows):
        """The memory plan's transformer call for teacher `plan` at `size` (height, width; None: the pipeline's):
        the pipeline run on the meta device with `rows` prompts up to its first transformer call, which also gives
        the block order and the rows per trajectory; (height, width, batch rows, args, kwargs) of that call."""
        self.height, self.width = size
        pipe = meta_pipeline(self._directory(self.source), model)
        try:
            args, kwargs = first_call(pipe, model, self._call(pipe, [PROBE_PROMPT] * rows, plan.cfg_scale,
                                                              PROBE_STEPS))
            self.names = call_order(model, candidates(model), args, kwargs)
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError, KeyError) as e:
            raise UserError(f"{type(pipe).__name__} cannot run on the meta device for a memory plan "
                            f"({type(e).__name__}: {error_detail(e)})") from None
        self.subject = model
        self.probes[plan.cfg_scale] = Probe(self.names, _rows(args, kwargs) // rows, None)
        height, width = self.height or _default(pipe, "height"), self.width or _default(pipe, "width")
        return height, width, _rows(args, kwargs), args, kwargs

    def describe(self, model):
        names = self.names or [f"{name}.{i}" for name, items in block_lists(model) for i in range(len(items))]
        lists = {}
        for name in names:
            lists[name.rsplit(".", 1)[0]] = lists.get(name.rsplit(".", 1)[0], 0) + 1
        return (f"diffusers {type(model).__name__} (generic adapter): "
                f"{', '.join(f'{n} {name}' for name, n in lists.items()) or 'no block lists'}")
