"""Sampler vs diffusers' DDPMScheduler(linear, learned_range, timestep_spacing="linspace",
clip_sample=False), checked below:
- agree (to float32): the respaced timesteps for S >= 2, the respaced betas (diffusers recomputes
  1 - abar_t / abar_prev on the fly), x0, the posterior mean, the learned-range log variance of every
  step but the last, hence whole trajectories fed the same noise.
- differ: S = 1 (diffusers' linspace(0, 999, 1) keeps t = 0, one denoising step from pure noise at
  the lowest noise level; we keep t = 999). The last step's log variance (diffusers clamps the zero
  posterior variance to 1e-20 instead of clipping it to the t=1 value; no noise is added at the last
  step, so samples are unaffected). diffusers clips x0 to [-1, 1] unless clip_sample=False (DiT does
  not clip latents). diffusers' schedule is float32 and recomputes the respaced betas in float32 (1e-4
  relative error on the small betas of a 1000-step schedule, where 1 - abar_t / abar_prev cancels); ours
  is float64.
"""
import numpy as np
import pytest
import torch

from tests.models.test_sampler import T, ToyModel
from vq4dit.models.diffusion import make_diffusion, p_mean_variance
from vq4dit.models.sampler import ddpm_sample


def diffusers_scheduler(steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="learned_range",
                                    timestep_spacing="linspace", clip_sample=False)
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [2, 5, 50, 250, 1000])
def test_diffusers_respacing_agrees(steps):
    sched = diffusers_scheduler(steps)
    diff = make_diffusion(steps)
    assert sched.timesteps.tolist() == diff.timestep_map[::-1].tolist()
    kept = sched.alphas_cumprod[sched.timesteps.flip(0)].double().numpy()
    np.testing.assert_allclose(kept, diff.alphas_cumprod, rtol=2e-5)
    # diffusers' per-step beta and learned-range log variance, all steps but the last (see module docstring)
    v = torch.linspace(-1, 1, 5)
    for j in range(1, steps):
        t = int(diff.timestep_map[j])
        got = sched._get_variance(t, predicted_variance=v).double().numpy()
        _, ours, _ = p_mean_variance(diff, torch.cat([torch.zeros(1, 5), v[None]], dim=1), torch.zeros(1, 5), j)
        # diffusers computes 1 - abar_t / abar_prev in float32: ~1e-4 relative error on small respaced betas
        np.testing.assert_allclose(got, ours[0].double().numpy(), rtol=1e-4, atol=1e-3)


def test_one_step_respacing_keeps_the_last_timestep():
    assert make_diffusion(1).timestep_map.tolist() == [T - 1]  # diffusers' linspace keeps t = 0 instead


@pytest.mark.parametrize("steps", [2, 5, 50])
def test_diffusers_trajectory_agrees(steps):
    """Same model, same noise generator: diffusers' step loop and ddpm_sample end at the same x0."""
    sched = diffusers_scheduler(steps)
    model, shape = ToyModel(4, seed=5), (2, 4, 4, 4)
    y = torch.tensor([1, 2])
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(x, torch.full((2,), int(t)), y)
            x = sched.step(out, int(t), x, generator=gen).prev_sample
    ours_gen = torch.Generator().manual_seed(9)
    ours = ddpm_sample(model, lambda: torch.randn(shape, generator=ours_gen), y, make_diffusion(steps))
    scale = float(ours.abs().max())
    torch.testing.assert_close(x, ours, rtol=1e-3, atol=1e-3 * max(1.0, scale))
