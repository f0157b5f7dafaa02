"""The sampler against a slow float64 reference written line by line from docs/method.md "Sampler".

The reference is driven by a deterministic toy model (a fixed random per-pixel linear map of x,
a sinusoid of the timestep and a class embedding; eps unbounded, v = tanh(...) in [-1, 1])
implemented twice: in float64 numpy for the reference and in float32 torch for `ddpm_sample`.
Both consume the same noise draws.
The comparison with diffusers' DDPMScheduler is in test_sampler_diffusers.py.
"""
import copy
import math

import numpy as np
import pytest
import torch

from vq4dit.models.adapters.base import SampleSettings
from vq4dit.models.diffusion import make_diffusion, p_mean_variance
from vq4dit.models.sampler import (
    Guidance,
    PerSampleNoise,
    apply_guidance,
    class_labels,
    ddpm_sample,
    generate,
    guided_channels_for,
    sample_seed,
)

T = 1000


# ------------------------------------------------------------ the reference, from docs/method.md "Sampler"

def reference_schedule(steps):
    """(kept timesteps, their alphas_cumprod) as python lists, in float64."""
    betas = [1e-4 + (0.02 - 1e-4) * k / (T - 1) for k in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    if steps == 1:
        keep = [T - 1]  # round(i * 999 / (S - 1)) is 0/0 for S = 1: the single step starts from pure noise
    else:
        keep = [int(round(i * (T - 1) / (steps - 1))) for i in range(steps)]
    return keep, [abar[t] for t in keep]


def reference_step(x, eps, v, j, abar):
    """Mean and log variance of p(x_{t-1} | x_t) at respaced step j, and x0; numpy float64 arrays.

    The log variance is None at the last step of a 1-step schedule (no t=1 value to clip to; unused).
    """
    a = abar[j]
    a_prev = abar[j - 1] if j > 0 else 1.0
    beta = 1.0 - a / a_prev
    x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)  # no clipping
    mean = math.sqrt(a_prev) * beta / (1.0 - a) * x0 + math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a) * x

    def posterior_variance(k):
        ak, ak_prev = abar[k], (abar[k - 1] if k > 0 else 1.0)
        return (1.0 - ak / ak_prev) * (1.0 - ak_prev) / (1.0 - ak)

    if j == 0 and len(abar) == 1:
        return mean, None, x0
    var = posterior_variance(j) if j > 0 else posterior_variance(1)  # the t=0 value (0) is clipped to t=1's
    frac = (v + 1.0) / 2.0
    log_var = frac * math.log(beta) + (1.0 - frac) * math.log(var)
    return mean, log_var, x0


def reference_sample(forward64, channels, null_class, draws, y, steps, cfg_scale):
    """The reverse process in float64: draws[0] is x_T, draws[1:] the noise of steps S-1 .. 1."""
    keep, abar = reference_schedule(steps)
    guided = 3 if channels == 4 else channels
    x = draws[0]
    used = 1
    for j in reversed(range(steps)):
        t = np.full(len(y), keep[j])
        cond = forward64(x, t, y)
        eps, v = cond[:, :channels].copy(), cond[:, channels:]
        if cfg_scale != 1.0:
            uncond = forward64(x, t, np.full(len(y), null_class))
            for c in range(guided):
                eps[:, c] = uncond[:, c] + cfg_scale * (cond[:, c] - uncond[:, c])
        mean, log_var, _ = reference_step(x, eps, v, j, abar)
        if j > 0:
            x = mean + np.exp(0.5 * log_var) * draws[used]
            used += 1
        else:
            x = mean
    assert used == len(draws)
    return x


class ToyModel(torch.nn.Module):
    """Deterministic (N, C, H, W), t, y -> (N, 2C, H, W): eps channels linear, v channels tanh in [-1, 1]."""

    def __init__(self, channels, size=4, num_classes=5, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.in_channels, self.input_size, self.num_classes = channels, size, num_classes
        self.mix = rng.normal(0, 0.4, (2 * channels, channels))
        self.mix[:channels] += 0.6 * np.eye(channels)  # eps roughly tracks x, as a trained model's does
        self.pixel = rng.normal(0, 0.3, (2 * channels, size, size))
        self.tcoef = rng.normal(0, 0.5, 2 * channels)
        self.embed = rng.normal(0, 0.5, (num_classes + 1, 2 * channels))  # last row: the null class
        self.calls = 0

    def forward64(self, x, t, y):
        h = np.einsum("oc,nchw->nohw", self.mix, x) + self.pixel[None]
        h = h + (self.tcoef[None] * np.sin(np.asarray(t, np.float64) / 157.0)[:, None])[:, :, None, None]
        h = h + self.embed[np.asarray(y)][:, :, None, None]
        c = self.in_channels
        return np.concatenate([h[:, :c], np.tanh(h[:, c:])], axis=1)

    def forward(self, x, t, y):
        self.calls += 1
        f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        h = torch.einsum("oc,nchw->nohw", f(self.mix), x) + f(self.pixel)[None]
        h = h + (f(self.tcoef)[None] * torch.sin(t.double() / 157.0).float()[:, None])[:, :, None, None]
        h = h + f(self.embed)[y][:, :, None, None]
        c = self.in_channels
        return torch.cat([h[:, :c], torch.tanh(h[:, c:])], dim=1)


class RecordedNoise:
    """The same standard-normal draws for the sampler (float32 torch) and the reference (float64 numpy)."""

    def __init__(self, count, shape, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(shape, generator=gen) for _ in range(count)]
        self.used = 0

    def __call__(self):
        self.used += 1
        return self.draws[self.used - 1].clone()

    def numpy(self):
        return [d.double().numpy() for d in self.draws]


def assert_close_to_reference(got, ref, rtol=2e-4):
    got = got.double().numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------- schedule and one step

@pytest.mark.parametrize("steps", [1, 2, 3, 5, 50, 250, 1000])
def test_respaced_schedule_matches_formula(steps):
    keep, abar = reference_schedule(steps)
    diff = make_diffusion(steps)
    assert diff.timestep_map.tolist() == keep
    np.testing.assert_allclose(diff.alphas_cumprod, abar, rtol=1e-10)
    betas = [1.0 - abar[j] / (abar[j - 1] if j else 1.0) for j in range(steps)]
    np.testing.assert_allclose(diff.betas, betas, rtol=1e-8)


def test_full_schedule_is_linear():
    diff = make_diffusion(None)
    np.testing.assert_allclose(diff.betas, [1e-4 + (0.02 - 1e-4) * k / (T - 1) for k in range(T)], rtol=1e-12)
    assert diff.timestep_map.tolist() == list(range(T))


@pytest.mark.parametrize("steps", [1, 2, 5, 50])
def test_p_mean_variance_matches_formula(steps):
    _, abar = reference_schedule(steps)
    diff = make_diffusion(steps)
    gen = torch.Generator().manual_seed(steps)
    x, eps = torch.randn(2, 3, 2, 4, 4, generator=gen)
    v = torch.rand(3, 2, 4, 4, generator=gen) * 2 - 1
    for j in range(steps):
        mean, log_var, x0 = p_mean_variance(diff, torch.cat([eps, v], dim=1), x, j)
        ref_mean, ref_log_var, ref_x0 = reference_step(x.double().numpy(), eps.double().numpy(),
                                                       v.double().numpy(), j, abar)
        assert_close_to_reference(x0, ref_x0, rtol=1e-5)
        assert_close_to_reference(mean, ref_mean, rtol=1e-5)
        if ref_log_var is not None:
            np.testing.assert_allclose(log_var.double().numpy(), ref_log_var, rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_guidance_channels(channels):
    assert guided_channels_for(channels) == (3 if channels == 4 else channels)
    gen = torch.Generator().manual_seed(channels)
    out = torch.randn(4, 2 * channels, 3, 3, generator=gen)
    got = apply_guidance(out, 1.5, guided_channels_for(channels))
    cond, uncond = out[:2], out[2:]
    for c in range(2 * channels):
        if c < guided_channels_for(channels):
            expected = uncond[:, c] + 1.5 * (cond[:, c] - uncond[:, c])
        else:
            expected = cond[:, c]  # unguided eps channel, or a variance channel: the conditional half
        torch.testing.assert_close(got[:, c], expected)


# ---------------------------------------------------------------- whole trajectories

@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
@pytest.mark.parametrize("steps", [1, 2, 5, 50, 250])
def test_ddpm_sample_matches_reference(steps, cfg_scale, channels):
    model = ToyModel(channels, seed=channels)
    y = torch.tensor([0, 3, 4])
    noise = RecordedNoise(steps, (3, channels, 4, 4), seed=steps)
    got = ddpm_sample(model, noise, y, make_diffusion(steps),
                      Guidance(cfg_scale, model.num_classes, guided_channels_for(channels)))
    assert noise.used == steps  # x_T plus one draw per step but the last
    assert model.calls == steps  # the CFG batch is one call
    ref = reference_sample(model.forward64, channels, model.num_classes, noise.numpy(), y.numpy(), steps, cfg_scale)
    assert_close_to_reference(got, ref)


def test_ddpm_sample_tiny_dit_matches_reference(tiny_latent_dit):
    """The real architecture as the model: float32 sampler vs the float64 reference on a float64 copy."""
    model, _ = tiny_latent_dit
    double = copy.deepcopy(model).double()
    # the timestep features are computed in float32 whatever the model dtype: cast them for the float64 copy
    double.t_embedder.mlp.register_forward_pre_hook(lambda module, args: (args[0].double(),))

    def forward64(x, t, y):
        with torch.no_grad():
            return double(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(np.asarray(y))).numpy()

    y = torch.tensor([1, 7])
    noise = RecordedNoise(5, (2, 4, 8, 8), seed=3)
    got = ddpm_sample(model, noise, y, make_diffusion(5), Guidance(1.5, model.num_classes, guided_channels_for(4)))
    ref = reference_sample(forward64, 4, model.num_classes, noise.numpy(), y.numpy(), 5, 1.5)
    assert_close_to_reference(got, ref, rtol=1e-3)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_model_sees_original_timesteps_and_null_labels(cfg_scale):
    model = ToyModel(1)
    seen = []
    y = torch.tensor([2, 1])
    ddpm_sample(model, RecordedNoise(5, (2, 1, 4, 4)), y, make_diffusion(5), Guidance(cfg_scale, 5),
                on_step=lambda i, x, t, labels: seen.append((i, x.shape[0], t.tolist(), labels.tolist())))
    keep, _ = reference_schedule(5)
    assert [s[0] for s in seen] == [4, 3, 2, 1, 0]
    for i, n, t, labels in seen:
        assert n == (4 if cfg_scale != 1.0 else 2)
        assert t == [keep[i]] * n
        assert labels == ([2, 1, 5, 5] if cfg_scale != 1.0 else [2, 1])


class HalfToy(torch.nn.Module):
    """ToyModel rounded to `dtype` (a parameter in that dtype makes it the model's compute dtype)."""

    def __init__(self, dtype):
        super().__init__()
        self.toy = ToyModel(1)
        self.in_channels, self.input_size, self.num_classes = 1, 4, self.toy.num_classes
        self.one = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.seen = set()

    def forward(self, x, t, y):
        self.seen.add(x.dtype)
        return self.toy(x.float(), t, y).to(self.one.dtype) * self.one


class Float32Interface(torch.nn.Module):
    """A parameterless float32 model that calls `inner` in its dtype: the contract, spelled out by hand."""

    def __init__(self, inner):
        super().__init__()
        self.inner = (inner,)  # a tuple hides its parameters: this wrapper computes in float32

    def forward(self, x, t, y):
        return self.inner[0](x.to(self.inner[0].one.dtype), t, y).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_is_called_in_its_dtype_and_the_sampler_stays_float32(dtype):
    model, y, inputs = HalfToy(dtype), torch.tensor([2, 1]), []
    got = ddpm_sample(model, RecordedNoise(5, (2, 1, 4, 4)), y, make_diffusion(5), Guidance(1.5, 5),
                      on_step=lambda i, x, t, labels: inputs.append(x.dtype))
    assert model.seen == {dtype} and set(inputs) == {torch.float32} and got.dtype == torch.float32
    # guidance and posterior in float32 on the upcast model output: bitwise the float32 sampler on that output
    ref = ddpm_sample(Float32Interface(model), RecordedNoise(5, (2, 1, 4, 4)), y, make_diffusion(5),
                      Guidance(1.5, 5))
    assert torch.equal(got, ref)


def test_cfg_needs_null_class():
    with pytest.raises(ValueError, match="null"):
        ddpm_sample(ToyModel(1), RecordedNoise(2, (1, 1, 4, 4)), torch.tensor([0]), make_diffusion(2), Guidance(1.5))


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_generate_matches_reference_with_per_sample_noise(cfg_scale):
    """generate draws sample i's noise from its own generator seeded by (seed, i): x_T first, then one per step."""
    model, steps, seed = ToyModel(4, seed=2), 5, 11
    indices, labels = [7, 0, 3], torch.tensor([1, 4, 2])
    shape = (4, 4, 4)
    per_sample = []
    for i in indices:
        gen = torch.Generator().manual_seed(sample_seed(seed, i))
        per_sample.append([torch.randn(shape, generator=gen).double().numpy() for _ in range(steps)])
    draws = [np.stack([d[k] for d in per_sample]) for k in range(steps)]
    got = generate(model, labels, indices, SampleSettings(seed, steps, cfg_scale, batch_size=2, progress=False))
    ref = reference_sample(model.forward64, 4, model.num_classes, draws, labels.numpy(), steps, cfg_scale)
    assert_close_to_reference(got, ref)


# ---------------------------------------------------------------- batching and index invariance

def test_generate_is_batch_size_and_subset_invariant(tiny_dit):
    def drawn(seed=3, batch_size=64):
        return SampleSettings(seed, steps=4, batch_size=batch_size, progress=False)

    model, _ = tiny_dit
    labels = class_labels(0, 5, model.num_classes)
    indices = list(range(5))
    runs = [generate(model, labels, indices, drawn(batch_size=b)) for b in (1, 2, 5)]
    # equal up to the float effects of batch size on matmul kernels (exact uint8 equality: test_images.py)
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-4, atol=1e-4)
    subset = [4, 1]
    part = generate(model, labels[subset], subset, drawn(batch_size=2))
    torch.testing.assert_close(part, runs[0][subset], rtol=1e-4, atol=1e-4)
    other_seed = generate(model, labels, indices, drawn(seed=4, batch_size=5))
    assert (other_seed - runs[0]).abs().flatten(1).amax(1).min() > 1e-2  # every sample changes with the seed


def test_per_sample_noise_depends_on_seed_and_index_only():
    a = PerSampleNoise(5, [0, 1, 2], (1, 2, 2), "cpu")
    b = PerSampleNoise(5, [2, 0], (1, 2, 2), "cpu")
    first_a, first_b = a(), b()
    torch.testing.assert_close(first_b, first_a[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(b(), a()[[2, 0]], rtol=0, atol=0)  # the second draws too
    assert not torch.equal(PerSampleNoise(6, [0], (1, 2, 2), "cpu")(), first_a[:1])
    assert len({sample_seed(s, i) for s in range(4) for i in range(50)}) == 200


@pytest.mark.parametrize("classes", [None, [3, 1]])
def test_class_labels(classes):
    labels = class_labels(7, 9, 10, classes)
    assert labels.dtype == torch.long and labels.shape == (9,)
    if classes:
        assert labels.tolist() == [3, 1] * 4 + [3]
    else:
        assert torch.equal(labels, class_labels(7, 9, 10)) and labels.min() >= 0 and labels.max() < 10
        assert not torch.equal(labels, class_labels(8, 9, 10))
