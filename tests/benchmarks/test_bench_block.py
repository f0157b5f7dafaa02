"""benchmarks/bench_block.py: its FLOP count of a DiT block against torch's counter, and a tiny run of the walk."""
import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_block import DEFAULT_POINTS, SWEEPS, Shape, forward_flops, main
from vq4dit.models.dit import DiTBlock


def test_forward_flops_match_torch_flop_counter():
    # slow reference: torch counts every matmul of a real forward (attention in the math kernel, so its two
    # products are aten matmuls it counts); a missed or miscounted product (attention, mlp ratio, adaLN) fails
    shape = Shape(hidden=32, heads=2, mlp_ratio=4.0, tokens=12)
    block, n = DiTBlock(32, 2, 4.0), 3
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        block(torch.randn(n, 12, 32), torch.randn(n, 32))
    assert forward_flops(shape) * n == counter.get_total_flops()


def test_tiny_run_times_every_stage_and_extrapolates(tmp_path):
    args = argparse.Namespace(points=4, iters=2, hidden=32, heads=2, tokens=4, device="cpu", gpu_tflops=100.0,
                              out=str(tmp_path / "block"))
    summary = main(args)
    stages = summary["stages"]
    layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    expected = {*SWEEPS, "k-means", "input moments", "training", "guard", "state save",
                "soften (prepare minus gptvq)", *(f"gptvq blocks.0.{name}" for name in layers)}
    assert expected <= set(stages)  # a wrapper that the walk does not call leaves its stage out
    assert all(stages[name]["seconds"] > 0 for name in expected - {"soften (prepare minus gptvq)"})
    sweep, training, kmeans = stages["FP targets sweep"], stages["training"], stages["k-means"]
    assert training["seconds_at_default"] == pytest.approx(training["seconds"] * 500 / 2)  # the default's 500
    assert sweep["seconds_at_default"] == pytest.approx(sweep["seconds"] * DEFAULT_POINTS / 4)  # 1600 points
    assert kmeans["seconds_at_default"] == kmeans["seconds"]  # independent of points and iterations
    walk = [v for name, v in stages.items() if name != "build block + random inputs"]
    assert summary["per_block_seconds_at_default"] == pytest.approx(sum(v["seconds_at_default"] for v in walk))
    saved = json.loads((tmp_path / "block.json").read_text())
    assert saved["summary"]["per_block_tflop_at_default"] == summary["per_block_tflop_at_default"] > 0
    assert "| training |" in (tmp_path / "block.md").read_text()
