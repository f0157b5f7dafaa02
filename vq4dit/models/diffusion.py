"""Gaussian diffusion with learned-range variance (docs/method.md "Sampler").

One `Diffusion` object holds a (possibly respaced) schedule in float64. Training uses the
full 1000-step schedule; sampling respaces to S steps and calls the model with the
original timestep indices (`timestep_map`).
"""
from dataclasses import dataclass

import numpy as np
import torch


def linear_betas(num_timesteps=1000, start=1e-4, end=0.02):
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def respaced_timesteps(num_timesteps, steps):
    """The kept original timesteps, round(i * (T-1) / (S-1)) for i = 0..S-1."""
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return np.array([num_timesteps - 1])
    return np.round(np.arange(steps) * (num_timesteps - 1) / (steps - 1)).astype(np.int64)


@dataclass
class Diffusion:
    betas: np.ndarray  # (S,) float64
    timestep_map: np.ndarray  # (S,) original timestep index of each step

    def __post_init__(self):
        b = self.betas
        self.num_steps = len(b)
        self.alphas_cumprod = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_ac = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the t=0 posterior variance is 0; clip its log to the t=1 value
        var = np.append(self.posterior_variance[1], self.posterior_variance[1:]) if len(b) > 1 else b
        self.posterior_log_var_clipped = np.log(var)
        self.coef_x0 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.coef_xt = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - b) / (1.0 - self.alphas_cumprod)


def make_diffusion(steps=None, num_timesteps=1000):
    """The training schedule (steps=None) or its respacing to `steps` steps."""
    betas = linear_betas(num_timesteps)
    if steps is None:
        return Diffusion(betas, np.arange(num_timesteps))
    keep = respaced_timesteps(num_timesteps, steps)
    ac = np.cumprod(1.0 - betas)[keep]
    new_betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return Diffusion(new_betas, keep)


def _gather(arr, i, x):
    """arr[i] as a float32 tensor broadcastable against x; i is an int or a (N,) tensor of step indices."""
    out = torch.as_tensor(arr, device=x.device)[torch.as_tensor(i, device=x.device)].float()
    return out.reshape(out.shape + (1,) * (x.dim() - out.dim()))


def q_sample(diff, x0, i, noise):
    ac = _gather(diff.alphas_cumprod, i, x0)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def q_posterior(diff, x0, xt, i):
    """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = _gather(diff.coef_x0, i, xt) * x0 + _gather(diff.coef_xt, i, xt) * xt
    return mean, _gather(diff.posterior_log_var_clipped, i, xt)


def p_mean_variance(diff, model_out, xt, i):
    """From model output (eps, v) to the mean, log-variance of p(x_{t-1}|x_t) and predicted x0."""
    eps, v = model_out.chunk(2, dim=1)
    frac = (v + 1) / 2
    min_log = _gather(diff.posterior_log_var_clipped, i, xt)
    max_log = _gather(np.log(diff.betas), i, xt)
    log_var = frac * max_log + (1 - frac) * min_log
    x0 = _gather(diff.sqrt_recip_ac, i, xt) * xt - _gather(diff.sqrt_recipm1_ac, i, xt) * eps
    mean, _ = q_posterior(diff, x0, xt, i)
    return mean, log_var, x0


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh((2.0 / np.pi) ** 0.5 * (x + 0.044715 * x**3)))


def discretized_gaussian_nll(x, mean, log_var):
    """-log p(x) for data in [-1, 1] quantised to 256 bins (the t=0 decoder term)."""
    inv_std = torch.exp(-0.5 * log_var)
    centered = x - mean
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_probs


def training_loss(diff, model_out, x0, xt, i, noise):
    """Hybrid loss of improved DDPM: MSE on eps + variational bound on the variance only.

    The VB term sees the mean through a stop-gradient so it trains only the variance channels.
    Returns per-sample losses (N,).
    """
    eps, v = model_out.chunk(2, dim=1)
    mse = ((eps - noise) ** 2).flatten(1).mean(1)
    frozen = torch.cat([eps.detach(), v], dim=1)
    mean, log_var, _ = p_mean_variance(diff, frozen, xt, i)
    true_mean, true_log_var = q_posterior(diff, x0, xt, i)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / np.log(2.0)
    nll = discretized_gaussian_nll(x0, mean, log_var).flatten(1).mean(1) / np.log(2.0)
    vb = torch.where(torch.as_tensor(i, device=x0.device) == 0, nll, kl)
    # scaled as in improved DDPM so the VB term matches the full-schedule loss
    return mse + vb * diff.num_steps / 1000.0
