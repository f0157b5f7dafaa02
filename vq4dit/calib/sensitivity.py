"""How sensitive a model's prediction is to each Linear's weight error: HIGGS-style noise probes.

The prediction error of a model whose layers l carry relative weight errors t_l is modelled as sum_l a_l t_l^2
(errors of different layers add, each grows with the square of its size). a_l is measured on the full-precision
model with Gaussian noise of relative Frobenius norm `noise` on the recorded teacher calls, in one of two ways:
- "model" (noise_sensitivities): the noise on layer l alone, the whole model run; a_l = (prediction MSE against the
  unperturbed model / mean square of the prediction) / noise^2. One forward of the probe calls per layer.
- "block" (block_sensitivities): per block, the noise on all its Linears at once, the whole model run: a_b, the sum
  of its layers' a_l; the block alone then tells them apart: a_l = a_b x e_l / sum_b e, e_l the block's relative
  output MSE with the noise on layer l alone. One forward of the probe calls per block (and one up to it, for its
  inputs), and a block call per layer: at Flux-dev's 57 blocks and 494 Linears about a fifth of the "model" cost,
  and the whole model is only run forward, so a streamed teacher can run it. The split inside a block assumes that
  every layer's block-output error reaches the prediction alike; on the embedded model its a_l rank as the "model"
  ones do with Spearman 0.92 (0.98 between two noise draws of "model").
So sum_l a_l t_l^2 estimates the relative prediction MSE of the quantized model. No gradients.
"""
import contextlib
import logging
from dataclasses import dataclass

import torch
from tqdm import tqdm

from vq4dit.calib.calls import flatten
from vq4dit.calib.capture import call_on, capture_model_inputs, step_filter
from vq4dit.calib.teacher import eval_teacher, teacher_plan
from vq4dit.utils.device import model_device

logger = logging.getLogger(__name__)

PROBE_SAMPLES, PROBE_STEPS = 8, 4  # teacher trajectories and kept sampler steps the probes run on
PROBE_NOISE = 0.1  # relative weight noise of a probe: near the errors of 1 to 3 bit codebooks


@dataclass(frozen=True)
class Probes:
    """The full-precision `model` the probes perturb, its models.adapters.Adapter `adapter`, and the model `calls`
    [(args, kwargs)] (CPU) they run it on."""

    model: object
    adapter: object
    calls: list

    def predictions(self):
        """The model's predictions (adapter.prediction) on the calls, float32 on the device the model runs on."""
        device, out = model_device(self.model), []
        for call in self.calls:
            args, kwargs = call_on(call, device)
            out.append(self.adapter.prediction(self.model, self.model(*args, **kwargs)).float())
        return out


def probe_calls(model, adapter, teacher, seed, device, progress=False):
    """The Probes of `model`: its calls of a small teacher run of TeacherConfig `teacher`'s guidance, PROBE_SAMPLES
    trajectories, PROBE_STEPS kept steps each, from the calibration stream of `seed`."""
    small = eval_teacher(teacher, PROBE_SAMPLES, PROBE_STEPS)
    plan = teacher_plan(small, seed)
    return Probes(model, adapter, capture_model_inputs(model, adapter.teacher_runs(model, plan, device),
                                                       step_filter(plan.steps, small.calib_timesteps),
                                                       progress=progress))


def linears_by_block(blocks, names):
    """[(block or None, [the names of `names` in it])]: Linear names grouped by the blocks [(name, module)] that hold
    them, in block order, then those outside every block (None)."""
    groups, left = [], list(names)
    for name, block in blocks:
        mine = [n for n in left if n.startswith(f"{name}.")]
        if mine:
            groups.append((block, mine))
            left = [n for n in left if n not in mine]
    return groups + ([(None, left)] if left else [])


def relative_noise(weight, noise, generator):
    """Gaussian noise shaped like `weight` (out, in) with Frobenius norm noise * ||weight||."""
    z = torch.randn(weight.shape, generator=generator).to(weight.device, torch.float32)  # (out, in)
    return z * (noise * weight.float().norm() / z.norm().clamp_min(1e-30))


@torch.no_grad()
def noise_sensitivities(probes, names, noise=PROBE_NOISE, seed=0, progress=False):
    """{name: a_l} for the Linears `names` of the Probes' model (full precision, unchanged on return): the relative
    prediction MSE per unit of squared relative weight error, measured with one noise draw per layer (from `seed`)."""
    refs = probes.predictions()
    power = sum(r.pow(2).sum().item() for r in refs) / max(sum(r.numel() for r in refs), 1)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in tqdm(names, desc="sensitivity", unit="layer", disable=not progress):
        weight = probes.model.get_submodule(name).weight
        kept = weight.detach().clone()
        weight.add_(relative_noise(kept, noise, generator).to(weight.dtype))
        try:
            preds = probes.predictions()
        finally:
            weight.copy_(kept)
        mse = sum((p - r).pow(2).sum().item() for p, r in zip(preds, refs)) / sum(r.numel() for r in refs)
        out[name] = mse / max(power, 1e-30) / noise**2
    return out


class _Reached(Exception):
    """Raised by a block's pre-hook to stop a model call once the block's inputs are kept."""


def block_inputs(model, block, calls, device):
    """[(args, kwargs)] of `block`'s call within each model call of `calls`, each model call stopped there (the
    hook runs before any other, so a streamed block is not moved in)."""
    seen = []

    def keep(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Reached

    handle = block.register_forward_pre_hook(keep, with_kwargs=True, prepend=True)
    try:
        for call in calls:
            args, kwargs = call_on(call, device)
            try:
                model(*args, **kwargs)
            except _Reached:
                pass
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def block_sensitivities(probes, names, seed=0, offload=None, progress=False):
    """noise_sensitivities' {name: a_l} by blocks (see the module docstring): the Linears `names` of each block of the
    Probes' adapter that holds any (the others are left out), the model unchanged on return. offload: the
    models.offload.HostBlocks streaming the model's blocks (None: it is on its device); a block is resident while
    its weights carry noise, so the noise is drawn and added in fp32 on the device, as in the unstreamed model."""
    preds = probes.predictions()
    reference = Reference(preds, max(sum(r.pow(2).sum().item() for r in preds), 1e-30))
    generator = torch.Generator().manual_seed(seed)
    out = {}
    groups = [(b, mine) for b, mine in linears_by_block(probes.adapter.blocks(probes.model), names) if b is not None]
    for block, mine in tqdm(groups, desc="sensitivity", unit="block", disable=not progress):
        with offload.resident(block) if offload is not None else contextlib.nullcontext():
            out.update(_block_split(probes, block, mine, reference, generator))
    return out


@dataclass(frozen=True)
class Reference:
    """The unperturbed model's predictions `preds` on the probe calls and their sum of squares `power`."""

    preds: list
    power: float


def _block_split(probes, block, names, reference, generator):
    """{name: a_l} of the Linears `names` of `block` (on its device): a_b from one noisy pass of the whole model,
    split by the block's own output errors."""
    model, refs = probes.model, reference.preds
    device = refs[0].device
    weights = [model.get_submodule(n).weight for n in names]
    kept = [w.detach().clone() for w in weights]
    draws = [relative_noise(k, PROBE_NOISE, generator).to(w.dtype) for w, k in zip(weights, kept)]
    try:
        for w, z in zip(weights, draws):
            w.add_(z)
        preds = probes.predictions()
    finally:
        for w, k in zip(weights, kept):
            w.copy_(k)
    total = sum((p - r).pow(2).sum().item() for p, r in zip(preds, refs)) / reference.power / PROBE_NOISE**2  # a_b
    local = dict.fromkeys(names, 0.0)
    for call in probes.calls:  # one call's block inputs at a time: a few GiB at Flux-dev's size
        (args, kwargs), = block_inputs(model, block, [call], device)
        ref = flatten(block(*args, **kwargs))[1]
        for n, w, k, z in zip(names, weights, kept, draws):
            w.add_(z)
            try:
                local[n] += sum((o.float() - r.float()).pow(2).sum().item()
                                for o, r in zip(flatten(block(*args, **kwargs))[1], ref))
            finally:
                w.copy_(k)
    spread = max(sum(local.values()), 1e-30)
    return {n: total * local[n] / spread for n in names}
