"""Respaced DDPM sampling with learned-range variance and classifier-free guidance.

Noise is drawn per sample from a generator seeded by (seed, sample index), so a sample's
image depends only on its index and the seed: sharding indices over processes or changing
the batch size gives the same images (up to floating-point effects of batch size).
"""
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from vq4dit.models.diffusion import make_diffusion, p_mean_variance
from vq4dit.utils.precision import compute_dtype


def sample_seed(seed, index):
    """A 63-bit seed for sample `index` of a run seeded `seed` (distinct for distinct pairs)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class PerSampleNoise:
    """Standard normal draws, one CPU generator per sample; the first draw is the initial latent."""

    def __init__(self, seed, indices, shape, device):
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
        self.shape, self.device = tuple(shape), device

    def __call__(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


def guided_channels_for(in_channels):
    """DiT guides only 3 of the 4 latent channels (kept for its FID numbers); others: all channels."""
    return 3 if in_channels == 4 else in_channels


def apply_guidance(out, scale, guided_channels):
    """out (2N, 2C, H, W) for [cond; uncond] -> (N, 2C, H, W) guided eps + conditional variance."""
    cond, uncond = out.chunk(2, dim=0)
    eps = cond[:, : cond.shape[1] // 2].clone()
    g = guided_channels
    eps[:, :g] = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([eps, cond[:, cond.shape[1] // 2:]], dim=1)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: `scale` (1: none), the class id the unconditional half of the batch gets, and how
    many leading output channels are guided (None: all; a learned-variance DiT's second half is not)."""

    scale: float = 1.0
    null_class: int | None = None
    channels: int | None = None

    @classmethod
    def of(cls, model, scale):
        """A DiT-like `model`'s guidance at `scale`: its null class is num_classes, its eps channels are guided."""
        return cls(scale, model.num_classes, guided_channels_for(model.in_channels))


@torch.no_grad()
def ddpm_sample(model, noise, y, diffusion, guidance=Guidance(), progress=False, on_step=None):
    """Run the reverse process from noise() for labels y (N,) under `guidance` (Guidance); returns x_0 (N, C, H, W).

    `noise` is a callable returning a fresh (N, C, H, W) standard-normal draw; `on_step(i, x, t, y)`
    sees the exact model inputs of every step (the doubled CFG batch included). The model is called in its
    own dtype (utils/precision.py); x, guidance and the posterior stay float32.
    """
    cfg_scale, null_class = guidance.scale, guidance.null_class
    use_cfg = cfg_scale != 1.0
    if use_cfg and null_class is None:
        raise ValueError("classifier-free guidance needs the null class id")
    x = noise()
    n = x.shape[0]
    dtype = compute_dtype(model)
    guided_channels = guidance.channels or x.shape[1]
    for i in tqdm(reversed(range(diffusion.num_steps)), total=diffusion.num_steps, desc="steps",
                  disable=not progress, leave=False):
        t = torch.full((n,), int(diffusion.timestep_map[i]), device=x.device, dtype=torch.long)
        if use_cfg:
            x_in, t_in = torch.cat([x, x]), torch.cat([t, t])
            y_in = torch.cat([y, torch.full_like(y, null_class)])
        else:
            x_in, t_in, y_in = x, t, y
        if on_step is not None:
            on_step(i, x_in, t_in, y_in)
        out = model(x_in.to(dtype), t_in, y_in).float()  # the network in its dtype, the rest in float32
        if use_cfg:
            out = apply_guidance(out, cfg_scale, guided_channels)
        mean, log_var, _ = p_mean_variance(diffusion, out, x, i)
        x = mean + torch.exp(0.5 * log_var) * noise() if i > 0 else mean
    return x


def class_labels(seed, num_samples, num_classes, classes=None):
    """Labels of a run: `classes` cycled to num_samples, or uniform draws seeded by `seed`."""
    if classes:
        return torch.tensor([classes[i % len(classes)] for i in range(num_samples)], dtype=torch.long)
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def generate(model, labels, indices, settings, device="cpu", on_step=None):
    """Samples for the given sample indices (with their labels) in model space (N, C, H, W), on CPU, drawn as
    `settings` says (models.adapters.base.SampleSettings: seed, steps, cfg_scale, batch_size; progress: a bar of each
    batch's steps, erased when the batch ends; the run's bar of samples is the caller's, jobs.sample.draw_shard)."""
    diffusion = make_diffusion(settings.steps)
    shape = (model.in_channels, model.input_size, model.input_size)
    outs = []
    for start in range(0, len(indices), settings.batch_size):
        idx = indices[start:start + settings.batch_size]
        y = labels[start:start + settings.batch_size].to(device)
        noise = PerSampleNoise(settings.seed, idx, shape, device)
        x = ddpm_sample(model, noise, y, diffusion, Guidance.of(model, settings.cfg_scale), settings.progress,
                        on_step)
        outs.append(x.float().cpu())
    return torch.cat(outs) if outs else torch.empty(0, *shape)
