"""Class-conditional DiTs: the project's own DiT (models/dit.py) and, through a thin wrapper, diffusers'
DiTTransformer2DModel. Both run DiT's learned-variance DDPM sampler with classifier-free guidance as teacher."""

import dataclasses

from vq4dit.models.adapters.base import CALIB_STREAM, Adapter, ImageSampler, drop_rows
from vq4dit.models.diffusion import make_diffusion
from vq4dit.models.loading import LATENT_DOWNSAMPLE
from vq4dit.models.sampler import Guidance, PerSampleNoise, class_labels, ddpm_sample, generate, sample_seed
from vq4dit.models.vae import load_vae, needs_vae, to_uint8
from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError


def dit_teacher_runs(model, plan, device):
    """Teacher batches for a DiT-like `model` (called as model(x, t, y); attributes in_channels, input_size,
    num_classes): Gaussian latents and uniform labels from the (seed, CALIB_STREAM) stream, `plan.steps` DDPM
    steps with CFG. A trajectory's noise depends only on the seed and its index, not on the batch size."""
    stream_seed = sample_seed(plan.seed, CALIB_STREAM)
    labels = class_labels(stream_seed, plan.num_samples, model.num_classes)
    diffusion = make_diffusion(plan.steps)
    shape = (model.in_channels, model.input_size, model.input_size)
    for start in range(0, plan.num_samples, plan.batch_size):
        idx = range(start, min(start + plan.batch_size, plan.num_samples))

        def run(idx=idx):
            noise = PerSampleNoise(stream_seed, idx, shape, device)
            ddpm_sample(model, noise, labels[idx.start:idx.stop].to(device), diffusion,
                        Guidance.of(model, plan.cfg_scale))

        yield len(idx), run


def class_conditions(num_classes, num_samples, seed, classes=None, prompts=None):
    """Per-sample class labels (N,) int64: `classes` cycled, or uniform draws from `seed`; both as conditions and
    as the labels stored in samples.npz."""
    if prompts:
        raise UserError("a class-conditional DiT takes class ids (--classes), not prompts")
    labels = class_labels(seed, num_samples, num_classes, classes)
    return labels, labels.numpy()


class DiTAdapter(Adapter):
    """The project's DiT: blocks.{i}, five Linears each (qkv, proj, fc1, fc2, adaLN_modulation.1)."""

    family = "dit"
    block_lists = ("blocks",)

    def teacher_runs(self, model, plan, device):
        return dit_teacher_runs(model, plan, device)

    def drop_labels(self, model, args, kwargs, p, generator):
        x, t, y = args  # DiT.forward(x, t, y)
        return (x, t, drop_rows(y, model.num_classes, p, generator)), kwargs

    def num_classes(self, model):
        return model.num_classes

    def conditions(self, model, num_samples, seed, classes=None, prompts=None):
        return class_conditions(model.num_classes, num_samples, seed, classes, prompts)

    def image_sampler(self, model, extra, settings, device):
        decoder = load_vae(settings.vae, device) if needs_vae(model.in_channels) else None
        size = model.input_size * (LATENT_DOWNSAMPLE if decoder is not None else 1)

        def draw(indices, labels):
            bars = settings.progress and distributed.world()[0] == 0  # under torchrun rank 0's only
            x = generate(model, labels, indices, dataclasses.replace(settings, progress=bars), device)
            return to_uint8(x, decoder)

        return ImageSampler(draw, (size, size))

    def plan_call(self, model, plan, vae_factor, size, tokens, rows):
        """The memory plan's model call (meta tensors) at `rows` batch rows, as t2i.TextToImageAdapter.plan_call;
        a DiT takes no size or prompt: its images are input_size latents (x vae_factor pixels)."""
        import torch

        x = torch.empty(rows, model.in_channels, model.input_size, model.input_size, device="meta")
        t, y = torch.empty(rows, device="meta"), torch.zeros(rows, dtype=torch.long, device="meta")
        pixels = model.input_size * vae_factor
        return pixels, pixels, rows, (x, t, y), {}

    def prediction(self, model, output):
        return output[:, :model.in_channels]  # the noise; the other channels are the variance interpolation

    def describe(self, model):
        return (f"DiT depth {len(model.blocks)}, hidden {model.pos_embed.shape[-1]}, {model.num_classes} classes, "
                f"{model.in_channels}x{model.input_size}x{model.input_size} inputs")
