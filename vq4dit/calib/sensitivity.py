"""How sensitive a model's prediction is to each Linear's weight error: HIGGS-style noise probes.

The prediction error of a model whose layers l carry relative weight errors t_l is modelled as sum_l a_l t_l^2
(errors of different layers add, each grows with the square of its size). a_l is measured on the full-precision
model: Gaussian noise of relative Frobenius norm `noise` is added to layer l alone, the model is run on recorded
teacher calls, and a_l = (prediction MSE against the unperturbed model / mean square of the prediction) / noise^2.
So sum_l a_l t_l^2 estimates the relative prediction MSE of the quantized model. No gradients, one forward of the
probe calls per layer.
"""
import logging

import torch
from tqdm import tqdm

from vq4dit.calib.capture import capture_model_inputs, step_filter
from vq4dit.calib.teacher import eval_teacher, teacher_plan

logger = logging.getLogger(__name__)

PROBE_SAMPLES, PROBE_STEPS = 8, 4  # teacher trajectories and kept sampler steps the probes run on
PROBE_NOISE = 0.1  # relative weight noise of a probe: near the errors of 1 to 3 bit codebooks


def probe_calls(model, adapter, teacher, seed, device, progress=False):
    """Model calls [(args, kwargs)] (CPU) of a small teacher run of TeacherConfig `teacher`'s guidance: PROBE_SAMPLES
    trajectories, PROBE_STEPS kept steps each, from the calibration stream of `seed`."""
    small = eval_teacher(teacher, PROBE_SAMPLES, PROBE_STEPS)
    plan = teacher_plan(small, seed)
    return capture_model_inputs(model, adapter.teacher_runs(model, plan, device),
                                step_filter(plan.steps, small.calib_timesteps), progress=progress)


def _predictions(model, adapter, calls, device):
    """The model's predictions (adapter.prediction) on `calls`, float32 on `device`."""
    out = []
    for args, kwargs in calls:
        args = [a.to(device) if torch.is_tensor(a) else a for a in args]
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        out.append(adapter.prediction(model, model(*args, **kwargs)).float())
    return out


def relative_noise(weight, noise, generator):
    """Gaussian noise shaped like `weight` (out, in) with Frobenius norm noise * ||weight||."""
    z = torch.randn(weight.shape, generator=generator).to(weight.device, torch.float32)  # (out, in)
    return z * (noise * weight.float().norm() / z.norm().clamp_min(1e-30))


@torch.no_grad()
def noise_sensitivities(model, adapter, calls, names, noise=PROBE_NOISE, seed=0, progress=False):
    """{name: a_l} for the Linears `names` of `model` (full precision, unchanged on return): the relative prediction
    MSE per unit of squared relative weight error, measured with one noise draw per layer (from `seed`)."""
    device = next(model.parameters()).device
    refs = _predictions(model, adapter, calls, device)
    power = sum(r.pow(2).sum().item() for r in refs) / max(sum(r.numel() for r in refs), 1)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in tqdm(names, desc="sensitivity", unit="layer", disable=not progress):
        weight = model.get_submodule(name).weight
        kept = weight.detach().clone()
        weight.add_(relative_noise(kept, noise, generator).to(weight.dtype))
        try:
            preds = _predictions(model, adapter, calls, device)
        finally:
            weight.copy_(kept)
        mse = sum((p - r).pow(2).sum().item() for p, r in zip(preds, refs)) / sum(r.numel() for r in refs)
        out[name] = mse / max(power, 1e-30) / noise**2
    return out
