"""Text-to-image diffusion transformers in diffusers pipelines (PixArt-alpha/Sigma, SD3/3.5, Flux.1): the shared part.

The zero-data teacher is the pipeline's own __call__ (its scheduler, its guidance) driven with precomputed prompt
embeddings, so that every transformer call is one sampler step:
1. the prompts (a --prompts file, or the built-in class-name prompts of models/prompts.py) are encoded once, on the
   CPU, by a pipeline holding only the text encoders and tokenizers; that pipeline is dropped before the first
   sampler step: no text encoder is in memory while the transformer samples or calibrates, and none ever takes
   device memory (T5-XXL in fp32 is 19 GB; encoding a few dozen prompts on the CPU takes minutes, once); under
   torchrun rank 0 encodes them and sends the embeddings to the other processes;
2. the teacher pipeline holds the scheduler and the transformer only (no VAE: output_type="latent"); trajectory i is
   conditioned on a prompt drawn from the seed and starts from noise of its own generator, seeded by (seed, i), so
   a trajectory does not depend on the batch it runs in.
Sampling goes through the full pipeline (text encoders and VAE) with the quantized transformer; sample i is
conditioned on prompts[i % len(prompts)] and its noise comes from a generator seeded by (seed, i).
"""
import gc
import json
import logging
from pathlib import Path

import numpy as np
import torch

from vq4dit.models.adapters.base import CALIB_STREAM, Adapter, ImageSampler
from vq4dit.models.pipelines import (
    is_pipeline_dir,
    load_pipeline,
    names_component,
    read_index,
    resolve_pipeline,
    to_uint8_images,
)
from vq4dit.models.prompts import BUILTIN_PROMPTS, prompt_list
from vq4dit.models.sampler import sample_seed
from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError, error_detail

logger = logging.getLogger(__name__)

ENCODE_BATCH = 16  # prompts per text-encoder call
ENCODE_DEVICE = "cpu"  # where the teacher's prompts are encoded (see above)
NEGATIVE_PROMPT = ""  # the unconditional branch of classifier-free guidance, as the pipelines default to


def vae_scale_factor(directory):
    """Pixels per latent pixel of a pipeline's VAE, from its config alone (2 ** (number of blocks - 1), as the
    pipelines compute it); 8 when the pipeline names no VAE or its VAE config has another layout. A VAE its
    model_index.json names without a readable config is a UserError (a missing vae/ folder was blamed on --height,
    as no multiple of the guessed factor)."""
    path = Path(directory) / "vae" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if is_pipeline_dir(directory) and names_component(directory, "vae"):
            raise UserError(f"{directory}: model_index.json names a vae, but {path} cannot be read "
                            f"({type(e).__name__}); the pipeline directory is incomplete") from None
        return 8
    blocks = config.get("block_out_channels") if isinstance(config, dict) else None
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) else 8  # a VAE of another layout (Qwen-Image's)


class TextToImageAdapter(Adapter):
    """Family hooks: `latent_size` (default latent side), `size_multiple` (latent pixels per token side),
    `encode(pipe, prompts, device)` and `negative(pipe, device)` (keyword tensors for the pipeline's __call__,
    one row per prompt, on CPU)."""

    family = "text-to-image"
    call_options = {}  # fixed keyword arguments of the pipeline's __call__
    teacher_options = {}  # and those of the teacher's calls (with precomputed embeddings)
    teacher_batch = 8  # trajectories sampled at once: 1024 px transformers are large
    guided_batch = True  # classifier-free guidance doubles the transformer's batch (False: guidance is an input)
    text_tokens = 0  # prompt tokens the pipeline pads to (its max_sequence_length default)
    video = False  # whether the pipeline draws frames (num_frames)
    encodes_once = True  # the prompts are encoded before the teacher runs (under torchrun: by rank 0 alone)
    encoders_by_layer = False  # True: the text encoders compute in fp32 one layer at a time (else: as loaded)

    def __init__(self):
        self.source, self.prompts, self.height, self.width, self.num_frames = None, prompt_list(), None, None, None

    def bind(self, extra, prompts=None, height=None, width=None, num_frames=None):
        """The pipeline the model came from (extra["pipeline"]["source"]), the teacher's prompts (None: the built-in
        class-name prompts), image size in pixels and frames (None: the pipeline's default). A given size is
        recorded in the returned extra keys, so that sampling the artifact draws images of the size it was
        calibrated at."""
        if num_frames is not None and not self.video:
            raise UserError(f"num_frames={num_frames}: {self.family} pipelines draw images; frames are for video "
                            "pipelines")
        pipeline = dict(extra.get("pipeline") or {})
        self.source = pipeline.get("source")
        self.prompts, self.height, self.width, self.num_frames = prompt_list(prompts), height, width, num_frames
        pipeline.update({k: v for k, v in (("height", height), ("width", width), ("num_frames", num_frames))
                         if v is not None})
        return {**extra, "pipeline": pipeline} if pipeline else dict(extra)

    # --- family hooks ---------------------------------------------------------------------------------------------
    def latent_size(self, model):
        return model.config.sample_size

    def size_multiple(self, model):
        return model.config.patch_size

    def encode(self, pipe, prompts, device):
        raise NotImplementedError

    def negative(self, pipe, device):
        return {}

    def prompt_tokens(self, directory):
        """Tokens of an encoded prompt in the pipeline at `directory` (memory plan)."""
        return self.text_tokens

    def example_inputs(self, model, rows, latent_hw, tokens, device="meta"):
        """Keyword arguments of one transformer call at `rows` batch rows, latents `latent_hw` (h, w) and `tokens`
        prompt tokens, as the pipeline makes them (empty tensors: for shapes on the meta device)."""
        raise NotImplementedError

    def plan_call(self, model, plan, vae_factor, size, tokens, rows):
        """The memory plan's transformer call (meta tensors) at `rows` batch rows and `size` (height, width; None:
        the pipeline's default): (height, width, batch rows, args, kwargs)."""
        height, width = self.image_size(model, vae_factor, *size)
        return height, width, rows, (), self.example_inputs(model, rows, (height // vae_factor, width // vae_factor),
                                                            tokens)

    # --- shared ---------------------------------------------------------------------------------------------------
    def rows_per_trajectory(self, plan):
        """diffusers pipelines guide when guidance_scale > 1, with the unconditional rows in the same batch."""
        return 2 if self.guided_batch and plan.cfg_scale > 1 else 1

    def image_size(self, model, factor, height=None, width=None):
        """(height, width) in pixels: the given ones or the pipeline's default, for a VAE of `factor` pixels per
        latent pixel; each must be a multiple of the factor times the model's token stride."""
        default = self.latent_size(model) * factor
        size = (height or default, width or default)
        step = factor * self.size_multiple(model)
        for name, value in zip(("height", "width"), size):
            if value % step:
                raise UserError(f"{name}={value} is not a multiple of {step} (VAE factor {factor} x token stride "
                                f"{step // factor} of {type(model).__name__})")
        return size

    def _directory(self, source, recorded=False):
        """The local pipeline directory of `source`; `recorded`: the one an artifact records (sampling without
        --pipeline), which may have moved since it was quantized."""
        if source is None:
            raise UserError(f"the {self.family} adapter knows no pipeline to run: quantize a diffusers pipeline "
                            "directory or hub id (--ckpt), or pass --pipeline DIR when sampling")
        hint = "; pass --pipeline DIR (the pipeline the artifact came from, wherever it is now)" if recorded else ""
        try:
            directory = resolve_pipeline(source)
        except UserError as e:  # a hub id that cannot be fetched
            raise UserError(f"{str(e).rstrip('.')}{hint}") from None
        if directory is None:
            what = "the pipeline the artifact records is " if recorded else ""
            raise UserError(f"{source}: {what}not a diffusers pipeline directory (no model_index.json){hint}")
        return directory

    def _encode_once(self, directory, prompts):
        """{name: (P, ...) CPU tensor} of `prompts` and {name: (1, ...)} of the negative prompt, from a pipeline
        that holds only the text encoders (on the CPU); it is released before this returns. Under torchrun rank 0
        alone loads the encoders and sends the embeddings to the others: a machine holds one set of encoders, not
        one per process."""
        if distributed.rank() != 0:
            return distributed.broadcast_tensors(None, 0), distributed.broadcast_tensors(None, 0)
        pipe = load_pipeline(directory, ENCODE_DEVICE, transformer=None, vae=None)
        try:
            with torch.no_grad():
                chunks = [self.encode(pipe, prompts[s:s + ENCODE_BATCH], ENCODE_DEVICE)
                          for s in range(0, len(prompts), ENCODE_BATCH)]
                negative = self.negative(pipe, ENCODE_DEVICE)
        except TypeError as e:  # e.g. a FluxPipeline asked for SD3's three prompts
            raise UserError(f"{directory}: its {type(pipe).__name__} does not encode prompts as the {self.family} "
                            f"transformer's pipeline does ({error_detail(e)}); model_index.json's _class_name "
                            "and transformer do not belong together") from None
        del pipe
        gc.collect()
        logger.info("encoded %d prompts on the CPU; text encoders released", len(prompts))
        positive = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        return distributed.broadcast_tensors(positive, 0), distributed.broadcast_tensors(negative, 0)

    def teacher_runs(self, model, plan, device):
        directory = self._directory(self.source)
        stream = sample_seed(plan.seed, CALIB_STREAM)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(stream))
        chosen = [int(order[i % len(order)]) for i in range(plan.num_samples)]  # prompt index per trajectory
        used = sorted(set(chosen))
        row = {p: r for r, p in enumerate(used)}
        pipe, conditioning, size = self.teacher_pipeline(model, directory, [self.prompts[p] for p in used], plan,
                                                         device)
        order_of_scheduler = getattr(pipe.scheduler, "order", 1)
        if order_of_scheduler != 1:
            raise UserError(f"{directory}: the scheduler {type(pipe.scheduler).__name__} is of order "
                            f"{order_of_scheduler} (several transformer calls per step); calibration needs one call "
                            "per sampler step")
        batch = min(plan.batch_size, self.teacher_batch)
        logger.info("teacher: %d trajectories of %d steps at %s, guidance %.3g, %d prompts", plan.num_samples,
                    plan.steps, "x".join(str(v) for v in size.values()), plan.cfg_scale, len(used))

        def run(idx):
            generators = [torch.Generator().manual_seed(sample_seed(stream, i)) for i in idx]
            pipe(**conditioning([row[chosen[i]] for i in idx]), **self.call_options, **self.teacher_options,
                 guidance_scale=plan.cfg_scale, num_inference_steps=plan.steps, generator=generators, **size,
                 output_type="latent")

        for start in range(0, plan.num_samples, batch):
            idx = list(range(start, min(start + batch, plan.num_samples)))
            yield len(idx), (lambda idx=idx: run(idx))

    def teacher_pipeline(self, model, directory, prompts, plan, device):
        """(pipeline holding `model`, conditioning(rows) -> the __call__ keywords of those rows of `prompts`, the
        size keywords of its calls). Here: the prompts encoded once on the CPU, a pipeline without text encoders
        or VAE."""
        height, width = self.image_size(model, vae_scale_factor(directory), self.height, self.width)
        positive, negative = self._encode_once(directory, prompts)
        components = [k for k in read_index(directory) if not k.startswith("_") and k not in ("transformer",
                                                                                               "scheduler")]
        pipe = load_pipeline(directory, device, transformer=model, **dict.fromkeys(components))
        # the same latents as the full pipeline's: this pipeline has no VAE and assumes the default factor of 8
        rescale = pipe.vae_scale_factor / vae_scale_factor(directory)
        guided = self.rows_per_trajectory(plan) == 2

        def conditioning(rows):
            rows = torch.tensor(rows)
            kwargs = {k: v[rows].to(device) for k, v in positive.items()}
            if guided:
                kwargs.update({k: v.expand(len(rows), *v.shape[1:]).to(device) for k, v in negative.items()})
            return kwargs

        return pipe, conditioning, {"height": round(height * rescale), "width": round(width * rescale)}

    def conditions(self, model, num_samples, seed, classes=None, prompts=None):
        """Sample i gets prompts[i % len(prompts)] (the built-in class-name prompts when none are given); the labels
        of samples.npz are those prompt indices."""
        if classes is not None:
            raise UserError(f"{type(model).__name__} is a text-to-image model: give prompts (--prompt / --prompts), "
                            "not class ids")
        if not prompts:  # samples.npz keeps only prompt indices: say which prompts they index
            logger.info("no --prompt or --prompts: the built-in prompts (%d ImageNet class names: %r, %r, ...)",
                        len(BUILTIN_PROMPTS), BUILTIN_PROMPTS[0], BUILTIN_PROMPTS[1])
        prompts = prompt_list(prompts)
        labels = np.arange(num_samples, dtype=np.int64) % len(prompts)
        return [prompts[i] for i in labels], labels

    def image_sampler(self, model, extra, settings, device):
        """Through the pipeline the model came from (its text encoders, VAE and scheduler), with this transformer."""
        recorded = extra.get("pipeline") or {}
        directory = self._directory(settings.pipeline or recorded.get("source"), recorded=not settings.pipeline)
        pipe = load_pipeline(directory, device, transformer=model)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if dtype != torch.float32:  # sample.py --precision bf16 / fp16: text encoders and VAE run in it too
            pipe.to(dtype=dtype)
        size, shape = self.sample_size(model, pipe, directory, recorded, settings)

        def draw(indices, prompts):
            generators = [torch.Generator().manual_seed(sample_seed(settings.seed, i)) for i in indices]
            out = pipe(prompt=list(prompts), **self.call_options, guidance_scale=settings.cfg_scale,
                       num_inference_steps=settings.steps, generator=generators, **size, output_type="np")
            return to_uint8_images(out.frames if self.video else out.images)

        return ImageSampler(draw, shape)

    def sample_size(self, model, pipe, directory, recorded, settings):
        """(size keywords of the sampling pipeline's calls, the shape of one sample without its channels)."""
        height, width = self.image_size(model, vae_scale_factor(directory), settings.height or recorded.get("height"),
                                        settings.width or recorded.get("width"))
        return {"height": height, "width": width}, (height, width)

    def prediction(self, model, output):
        return output[0] if isinstance(output, tuple) else output.sample

    def describe(self, model):
        blocks = ", ".join(f"{len(getattr(model, attr))} {attr}" for attr in self.block_lists)
        return f"diffusers {type(model).__name__}: {blocks}, {model.config.num_attention_heads} heads x " \
               f"{model.config.attention_head_dim}"
