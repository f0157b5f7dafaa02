import copy

import pytest
import torch

from tests.calib.conftest import tiny_dit
from vq4dit.calib.cache import ActivationStore
from vq4dit.calib.capture import Schedule, capture, step_filter
from vq4dit.calib.metrics import chain_errors, prediction_mse
from vq4dit.models.adapters import TeacherPlan, adapter_for


def perturbed(model, scale=0.05):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.blocks.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def test_chain_errors_match_a_direct_computation():
    fp = tiny_dit(depth=3)
    q = perturbed(fp)
    adapter = adapter_for(fp)
    plan = TeacherPlan(num_samples=3, steps=4, cfg_scale=1.5, seed=0, batch_size=2)
    schedule = Schedule(adapter.teacher_runs(fp, plan, "cpu"), step_filter(4, 2), 12)
    cset = capture(fp, adapter.blocks(fp), schedule, ActivationStore(token_dtype=torch.float32), progress=False)
    tokens, c = cset.slots["s0.0"], cset.slots["s0.1"]
    with torch.no_grad():
        h, h_fp, expected = tokens, tokens, []
        for block, fp_block in zip(q.blocks, fp.blocks):
            h, h_fp = block(h, c), fp_block(h_fp, c)
            expected.append(((h - h_fp) ** 2).mean().item())
    assert chain_errors(list(q.blocks), list(fp.blocks), cset, "cpu", chunk=5) == pytest.approx(expected,
                                                                                                      rel=1e-5)
    assert chain_errors(list(fp.blocks), list(fp.blocks), cset, "cpu") == [0.0, 0.0, 0.0]


def test_prediction_mse_uses_only_the_noise_channels():
    fp = tiny_dit()
    q = perturbed(fp)
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    with torch.no_grad():
        expected = ((q(x, t, y)[:, :1] - fp(x, t, y)[:, :1]) ** 2).mean().item()
    calls = [((x[:3], t[:3], y[:3]), {}), ((x[3:], t[3:], y[3:]), {})]
    assert prediction_mse(q, fp, adapter_for(fp), calls, "cpu") == pytest.approx(expected, rel=1e-5)
