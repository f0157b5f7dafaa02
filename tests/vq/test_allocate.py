"""The bit-allocation dynamic program (vq/allocate.py) against brute force, and the settings parser."""
import math
from itertools import product

import numpy as np
import pytest

from vq4dit.vq import allocate
from vq4dit.vq.allocate import Option, Setting, parse_settings, solve


def brute_force(options, budget):
    """The exact optimum by trying every combination (small problems only); None when nothing fits."""
    best, picks = math.inf, None
    for combo in product(*(range(len(layer)) for layer in options)):
        cost = sum(options[i][j].cost for i, j in enumerate(combo))
        error = sum(options[i][j].error for i, j in enumerate(combo))
        if cost <= budget and error < best:
            best, picks = error, list(combo)
    return picks


def total(options, picks, key):
    return sum(getattr(options[i][j], key) for i, j in enumerate(picks))


def random_problem(rng, layers, per_layer, scale):
    """Options whose costs share a large common factor (as index bits of real layers do) and random errors."""
    return [[Option(int(rng.integers(1, 9)) * scale, float(rng.random())) for _ in range(per_layer)]
            for _ in range(layers)]


@pytest.mark.parametrize("seed", range(40))
def test_solve_equals_brute_force(seed):
    """The least summed error under the budget, as trying every combination finds it. Catches an off-by-one in the
    cost shift, a backtrack through the wrong cell, or a budget cell left out of the final argmin."""
    rng = np.random.default_rng(seed)
    options = random_problem(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), 3 * 2**20)
    budget = int(rng.integers(0, 9 * len(options) * 3 * 2**20))
    expect, got = brute_force(options, budget), solve(options, budget)
    if expect is None:
        assert got is None
        return
    assert total(options, got, "cost") <= budget
    assert total(options, got, "error") == pytest.approx(total(options, expect, "error"), rel=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_a_coarse_grid_never_exceeds_the_budget(seed, monkeypatch):
    """Costs without a common factor and a grid of few cells: costs round up, so the choice stays within the true
    budget and is no better than the optimum (mutation: costs rounded down -> over budget)."""
    monkeypatch.setattr(allocate, "MAX_CELLS", 7)
    rng = np.random.default_rng(seed)
    options = [[Option(int(rng.integers(50, 400)), float(rng.random())) for _ in range(3)] for _ in range(4)]
    budget = int(rng.integers(600, 1600))
    got, best = solve(options, budget), brute_force(options, budget)
    if got is not None:
        assert total(options, got, "cost") <= budget
        assert total(options, got, "error") >= total(options, best, "error") - 1e-12


def test_infeasible_budget_is_none():
    assert solve([[Option(4, 0.0), Option(8, 0.0)]], 3) is None


def test_parse_settings_sorts_by_bits_and_refuses_bad_entries():
    assert parse_settings("256x4, 256x8,64x2,256x4") == (Setting(256, 8), Setting(256, 4), Setting(64, 2))
    assert Setting(256, 6).bits == pytest.approx(8 / 6) and Setting(100, 4).bits == 7 / 4  # stored: ceil(log2 k)
    for bad in ("256", "x4", "256x0", "1x4", "70000x4", "256x4,"):
        with pytest.raises(ValueError, match="not KxD"):
            parse_settings(bad)


def test_residual_settings_count_every_stage():
    """KxDxS: S residual stages cost S x ceil(log2 k) / d bits (mutation: bits of one stage -> k256 d8 x2 sorts
    before k256 d4 and reads 1 bit, fails); KxDx1 is KxD."""
    assert parse_settings("256x4,256x8x2,256x8x1") == (Setting(256, 8), Setting(256, 4), Setting(256, 8, 2))
    assert Setting(256, 8, 2).bits == 2 and Setting(4096, 8).bits == 1.5 and str(Setting(256, 8, 2)) == "k256 d8 x2"
    for bad in ("256x8x0", "256x8x9", "256x8x2x1", "256x8x"):
        with pytest.raises(ValueError, match="KxDxS"):
            parse_settings(bad)
