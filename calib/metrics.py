"""Errors of a quantized DiT against its full-precision teacher, computed in chunks (no stored activations)."""
import torch

from calib.inputs import to_cache


@torch.no_grad()
def block_mse(block, tokens, c, target, device, batch_size=256, out=None):
    """Mean squared error of block(tokens, c) against target (M, T, D) over all points (a float).

    With `out` (M, T, D), the block outputs are also written there (it may be `tokens` itself: each chunk's
    output depends only on that chunk), so the sequential walk gets the next block's inputs from the same sweep.
    """
    total = 0.0
    for s in range(0, tokens.shape[0], batch_size):
        h = block(tokens[s:s + batch_size].to(device).float(), c[s:s + batch_size].to(device))
        total += (h - target[s:s + batch_size].to(device).float()).pow(2).sum().item()
        if out is not None:
            out[s:s + batch_size] = to_cache(h, out.dtype)
    return total / target.numel()


@torch.no_grad()
def chain_mse(blocks, fp_blocks, tokens, c, device, batch_size=256):
    """Per-block output MSE (list of floats) of `blocks` fed by themselves vs `fp_blocks` fed by themselves,
    both starting from the block-0 inputs tokens (M, T, D), c (M, D): the error a sampler would see."""
    totals = [0.0] * len(blocks)
    for s in range(0, tokens.shape[0], batch_size):
        h = tokens[s:s + batch_size].to(device).float()
        cc = c[s:s + batch_size].to(device)
        h_fp = h
        for i, (block, fp_block) in enumerate(zip(blocks, fp_blocks)):
            h, h_fp = block(h, cc), fp_block(h_fp, cc)
            totals[i] += (h - h_fp).pow(2).sum().item()
    return [total / tokens.numel() for total in totals]


@torch.no_grad()
def noise_mse(model, teacher, x, t, y, device, batch_size=256):
    """MSE of the predicted noise (first C output channels) of `model` vs `teacher` on inputs x (M, C, H, W)."""
    total, count = 0.0, 0
    channels = x.shape[1]
    for s in range(0, x.shape[0], batch_size):
        args = [a[s:s + batch_size].to(device) for a in (x, t, y)]
        eps, eps_fp = model(*args)[:, :channels], teacher(*args)[:, :channels]
        total += (eps - eps_fp).pow(2).sum().item()
        count += eps.numel()
    return total / count


@torch.no_grad()
def weight_mse(layer, fp_weight):
    """Mean squared error of a VQLinear's reconstructed weight against the FP weight (out, in)."""
    return (layer.weight() - fp_weight.to(layer.codebook.device)).pow(2).mean().item()
