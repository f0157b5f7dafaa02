"""From model space to uint8 images: the SD VAE for latent DiTs, identity for pixel-space DiTs.

Latent models (4 channels) are decoded with diffusers' AutoencoderKL: image = decode(latent / 0.18215).
Pixel-space models (1 or 3 channels, e.g. the embedded digits model) skip the VAE.
"""
import logging
import os

import numpy as np
import torch

from vq4dit.utils.errors import UserError, check_finite_output, error_detail

logger = logging.getLogger(__name__)

VAE_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
LATENT_SCALE = 0.18215


def needs_vae(in_channels):
    return in_channels == 4


def load_vae(name="ema", device="cpu"):
    """AutoencoderKL from `ema`/`mse` (the SD VAEs on the hub) or a local diffusers directory."""
    from diffusers.models import AutoencoderKL

    from vq4dit.models.pipelines import loading_bars

    source = VAE_IDS.get(name, name)
    if name not in VAE_IDS and not os.path.isdir(name):
        raise UserError(f"--vae {name}: not a directory; use ema, mse or a local AutoencoderKL directory")
    try:
        with loading_bars():
            vae = AutoencoderKL.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"--vae {name}: cannot load AutoencoderKL from {source} ({error_detail(e)})") from None
    logger.info("loaded VAE %s", source)
    return vae.to(device).eval()


def images_to_uint8(x):
    """x (N, C, H, W) floats in [-1, 1], C in (1, 3) -> uint8 numpy (N, H, W, 3); grey replicated to 3 channels.
    NaN or Inf in x is a utils.errors.NonFiniteOutput."""
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 image channels, got {x.shape[1]}")
    check_finite_output(x, "the sampled images")  # NaN would become black pixels
    # clamp(127.5 x + 128) then truncation == rounding 127.5 (x + 1), as in DiT's sampling script
    u = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)  # (N, C, H, W)
    return u.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous().cpu().numpy()


@torch.no_grad()
def decode(vae, latents, batch_size=16):
    """latents (N, 4, h, w) -> images (N, 3, 8h, 8w) floats in about [-1, 1]."""
    device = next(vae.parameters()).device
    outs = [vae.decode(latents[s:s + batch_size].to(device) / LATENT_SCALE).sample.float().cpu()
            for s in range(0, len(latents), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, 3, latents.shape[2] * 8, latents.shape[3] * 8)


def to_uint8(samples, vae=None, batch_size=16):
    """Model-space samples (N, C, H, W) -> uint8 (N, H', W', 3): VAE decode for latents, else as pixels."""
    if needs_vae(samples.shape[1]):
        if vae is None:
            raise ValueError("4-channel latents need a VAE to decode")
        samples = decode(vae, samples, batch_size)
    return np.asarray(images_to_uint8(samples))
