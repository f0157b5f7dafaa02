"""Zero-data calibration inputs: the full-precision model's own CFG sampling trajectories.

No images are used (METHOD.md section 3, step 4). Gaussian latents and random class labels run
through the FP sampler; at a few evenly spaced steps of every trajectory the exact model inputs
(x_t, t, y), the doubled CFG batch [cond; uncond] included, become calibration points. From them
the block-0 inputs (tokens, c) are computed once; block targets are computed block by block
while the calibration walks the model, so at most two (M, T, D) activation tensors live at once.

Memory at the defaults for DiT-XL/2 (M = 32 trajectories x 2 (CFG) x 25 steps = 1600 points,
T = 256, D = 1152, fp16): one (M, T, D) tensor is 1600 * 256 * 1152 * 2 B = 900 MiB; the
sequential walk holds two (block input, block target) = 1.76 GiB, plus c (M, D) fp32 = 7 MiB.
Keeping all 28 block targets instead would take 28 * 900 MiB = 24.6 GiB.
"""
import logging

import numpy as np
import torch

from models.diffusion import make_diffusion
from models.sampler import PerSampleNoise, class_labels, ddpm_sample, guided_channels_for, sample_seed

logger = logging.getLogger(__name__)

# the calibration noise stream: seeds derived from (seed, CALIB_STREAM) never coincide with the
# per-sample seeds (seed, index) that evaluation sampling uses for small sample indices
CALIB_STREAM = 2**40 + 7


def calib_steps(steps, count):
    """Sampler step indices i (steps-1 is the noisiest, 0 the last) kept per trajectory: `count` evenly spaced.

    The spacing (steps-1)/(count-1) is >= 1, so the rounded indices are distinct.
    """
    if not 1 <= count <= steps:
        raise ValueError(f"count must be in 1..{steps}, got {count}")
    return sorted({int(i) for i in np.round(np.linspace(0, steps - 1, count))}, reverse=True)


@torch.no_grad()
def teacher_inputs(model, num_samples, timesteps, steps, cfg_scale, seed, device, batch_size=64):
    """Model inputs seen along `num_samples` FP sampling trajectories at `timesteps` steps each.

    Returns x (M, C, H, W) float32, t (M,) int64, y (M,) int64 on CPU, M = num_samples * timesteps
    * (2 if cfg_scale != 1 else 1), ordered by (trajectory batch, step, CFG half, sample).
    """
    stream_seed = sample_seed(seed, CALIB_STREAM)
    labels = class_labels(stream_seed, num_samples, model.num_classes)
    keep = set(calib_steps(steps, timesteps))
    diffusion = make_diffusion(steps)
    shape = (model.in_channels, model.input_size, model.input_size)
    xs, ts, ys = [], [], []

    def capture(i, x_in, t_in, y_in):
        if i in keep:
            xs.append(x_in.float().cpu())
            ts.append(t_in.cpu())
            ys.append(y_in.cpu())

    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        noise = PerSampleNoise(stream_seed, idx, shape, device)
        ddpm_sample(model, noise, labels[idx.start:idx.stop].to(device), diffusion, cfg_scale,
                    null_class=model.num_classes, guided_channels=guided_channels_for(model.in_channels),
                    on_step=capture)
    x, t, y = torch.cat(xs), torch.cat(ts), torch.cat(ys)
    logger.info("teacher trajectories: %d samples x %d steps -> %d calibration points", num_samples,
                len(keep), x.shape[0])
    return x, t, y


def to_cache(h, dtype):
    """Activations h (B, T, D) -> CPU `dtype` for the cache; a value beyond dtype's range (fp16: 65504) must
    stop the run here rather than turn into inf and a NaN calibration loss later."""
    out = h.to("cpu", dtype)
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"activations exceed the {dtype} range of the calibration cache "
                                 f"(max |x| = {h.abs().max().item():.4g}); this model needs a wider cache dtype")
    return out


@torch.no_grad()
def embed_inputs(model, x, t, y, device, batch_size=256, dtype=torch.float16):
    """Block-0 inputs: tokens (M, T, D) in `dtype` and c (M, D) float32, both on CPU."""
    tokens, cs = [], []
    for s in range(0, x.shape[0], batch_size):
        tok, c = model.embed(x[s:s + batch_size].to(device), t[s:s + batch_size].to(device),
                             y[s:s + batch_size].to(device))
        tokens.append(to_cache(tok, dtype))
        cs.append(c.float().cpu())
    return torch.cat(tokens), torch.cat(cs)


@torch.no_grad()
def run_block(block, tokens, c, device, batch_size=256, out=None):
    """block(tokens, c) over all M points in chunks; tokens (M, T, D) CPU -> (M, T, D) in tokens' dtype.

    `out` may be `tokens` itself: each chunk's output depends only on that chunk, so the walk can
    overwrite its input in place and never hold a third activation tensor.
    """
    out = torch.empty_like(tokens) if out is None else out
    for s in range(0, tokens.shape[0], batch_size):
        h = block(tokens[s:s + batch_size].to(device).float(), c[s:s + batch_size].to(device))
        out[s:s + batch_size] = to_cache(h, out.dtype)
    return out


def cache_bytes(points, tokens, hidden, dtype_bytes=2):
    """Bytes of one (points, tokens, hidden) activation tensor (the README's memory figure)."""
    return points * tokens * hidden * dtype_bytes
