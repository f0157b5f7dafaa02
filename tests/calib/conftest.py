"""Tiny DiTs with non-trivial weights for the calibration tests (fast on one CPU thread)."""
import copy
import json

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.calib.capture import calib_steps
from vq4dit.calib.checkpoints import CalibLog
from vq4dit.calib.problem import Problem
from vq4dit.jobs.config import QuantizeConfig
from vq4dit.jobs.methods import method_for
from vq4dit.jobs.quantize import Run, record_and_calibrate
from vq4dit.models.adapters.base import CALIB_STREAM
from vq4dit.models.diffusion import make_diffusion
from vq4dit.models.dit import DiT
from vq4dit.models.sampler import Guidance, PerSampleNoise, class_labels, ddpm_sample, sample_seed
from vq4dit.vq import CodebookSpec, VQLinear, quantize_linears


def tiny_dit(depth=2, seed=0):
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    with torch.no_grad():  # the training init zeroes adaLN (blocks would be identities); draw everything instead
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model.eval()


def tiny_config(**overrides):
    values = dict(codebook_size=16, dim=2, candidates=2, kmeans_iters=10, iters=30, batch_size=4, steps=5,
                  calib_timesteps=3, calib_samples=3, device="cpu")
    values.update(overrides)
    return QuantizeConfig.from_flat(values).validate()


def run_calibration(student, teacher, adapter, qlayers, config, out_dir):
    """The quantize job's record and calibrate stages on an in-memory pair (what jobs.quantize runs after k-means):
    every layer is hard afterwards; returns the per-block stats."""
    method = method_for(config.method, config.codebooks, config.seed)
    problem = Problem(student, teacher, adapter, qlayers, method.prepare, config.seed, progress=False,
                      needs_moments=config.output_aware)
    return record_and_calibrate(problem, Run.open(config, str(out_dir), progress=False))


def calib_log(out_dir):
    """The lines of a run_calibration's log: until the artifact is written it is in the calibration state."""
    with open(CalibLog(str(out_dir)).working) as f:
        return [json.loads(line) for line in f.read().splitlines()]


def quantized_pair(config, depth=2, seed=0):
    """(student with soft VQLinear layers, FP teacher, {name: VQLinear}) for `config`."""
    teacher = tiny_dit(depth, seed)
    student = copy.deepcopy(teacher)
    c = config.codebooks
    candidates = c.candidates if config.method == "vq4dit" else 1
    qlayers = quantize_linears(student, CodebookSpec(c.k, c.dim, candidates, c.kmeans_iters), seed=config.seed,
                               progress=False)
    return student, teacher, qlayers


def reference_points(model, num_samples, steps, kept, cfg_scale, seed, batch_size):
    """The model inputs at the kept steps, written out as a plain loop over DiT's own sampler."""
    stream = sample_seed(seed, CALIB_STREAM)
    labels = class_labels(stream, num_samples, model.num_classes)
    keep = set(calib_steps(steps, kept))
    xs, ts, ys = [], [], []
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        noise = PerSampleNoise(stream, idx, (model.in_channels, model.input_size, model.input_size), "cpu")

        def on_step(i, x, t, y):
            if i in keep:
                xs.append(x.clone())
                ts.append(t.clone())
                ys.append(y.clone())

        ddpm_sample(model, noise, labels[idx.start:idx.stop], make_diffusion(steps),
                    Guidance(cfg_scale, model.num_classes, channels=1), on_step=on_step)
    return torch.cat(xs), torch.cat(ts), torch.cat(ys)


def soft_layer(out=8, inp=8, k=8, d=2, n=2, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out)
    return VQLinear.from_linear(linear, CodebookSpec(k, d, candidates=n, kmeans_iters=5), seed=seed), linear


def block_problem(seed=0, candidates=2, points=64):
    """A tiny DiT block and its quantized copy: (layers, loss_fn(idx) -> L_d of a minibatch, error() -> L_d on all
    points). Targets are the FP block's outputs on random inputs; candidates=1 gives codebook-only (hard nearest)."""
    teacher = tiny_dit(depth=1, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    x, c = torch.randn(points, 16, 32, generator=g), torch.randn(points, 32, generator=g)  # (M, T, D), (M, D)
    with torch.no_grad():
        target = teacher.blocks[0](x, c)  # (M, T, D)
    student = copy.deepcopy(teacher)
    layers = list(quantize_linears(student, CodebookSpec(16, 2, candidates, kmeans_iters=10), seed=seed,
                                   progress=False).values())
    if candidates == 1:
        for layer in layers:
            layer.harden()
    block = student.blocks[0]

    def loss_fn(idx):
        return F.mse_loss(block(x[idx], c[idx]), target[idx])

    def error():
        with torch.no_grad():
            return loss_fn(torch.arange(points)).item()
    return layers, loss_fn, error
