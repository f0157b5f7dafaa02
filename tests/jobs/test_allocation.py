"""--bits on constructed problems: noise-probe sensitivities (calib/sensitivity.py) and the allocation
(jobs/allocation.py) give the bits to the layer the output depends on."""
import pytest
import torch
from torch import nn

from vq4dit.calib.sensitivity import noise_sensitivities, probe_calls
from vq4dit.jobs.allocation import WeightFit, allocate, choose, weight_errors
from vq4dit.jobs.config import load_config
from vq4dit.vq.allocate import Setting

WIDTH = 32
LOW, HIGH = Setting(16, 8), Setting(16, 2)  # 0.5 and 2 index bits per weight


class Two(nn.Module):
    """out = 10 a(x) + 0.1 b(x): the output is 10^4 times as sensitive to a's relative weight error as to b's.
    a's rows are constant (+-1) plus a little noise (both settings fit it well: more bits lower its relative error by
    about 0.005), b's weight is Gaussian (by about 0.5): by weight error alone b would get the bits."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            signs = torch.randint(0, 2, (WIDTH, 1), generator=gen) * 2.0 - 1  # (out, 1)
            self.a.weight.copy_(signs + 0.1 * torch.randn(WIDTH, WIDTH, generator=gen))
            self.b.weight.copy_(torch.randn(WIDTH, WIDTH, generator=gen))

    def forward(self, x):
        return 10 * self.a(x) + 0.1 * self.b(x)


class Stub:
    """A teacher that runs `steps` calls per batch on Gaussian inputs; the whole output is the prediction."""

    def teacher_runs(self, model, plan, device):
        gen = torch.Generator().manual_seed(plan.seed)
        for start in range(0, plan.num_samples, plan.batch_size):
            n = min(plan.batch_size, plan.num_samples - start)

            def run(n=n):
                for _ in range(plan.steps):
                    model(torch.randn(n, WIDTH, generator=gen))

            yield n, run

    def prediction(self, model, output):
        return output

    def blocks(self, model):
        return []  # every Linear lies outside the blocks: --bits-probe block probes them with the whole model


def config(**values):
    return load_config(overrides={"steps": 5, "kmeans_iters": 5, "method": "kmeans",
                                  "bits_settings": f"{LOW.k}x{LOW.d},{HIGH.k}x{HIGH.d}", **values})


def test_probes_find_the_sensitive_layer_and_leave_the_model_unchanged():
    """a_a / a_b is about 10^4 (the output scales a by 10 and b by 0.1, weights of similar norm). Catches probes
    that perturb the wrong layer, measure nothing (a = 0), or leave the noise in the weights."""
    model, c = Two().eval(), config(bits=1.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probes = probe_calls(model, Stub(), c.teacher, 0, "cpu")
    sens = noise_sensitivities(probes, ["a", "b"])
    assert sens["a"] > 1000 * sens["b"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_sensitive_layer_gets_the_bits():
    """Budget 1.25 bits: one layer at 2 bits, the other at 0.5. The output-sensitive layer a gets 2 bits although
    b's weight error gains more from them (mutation "sensitivities ignored" in jobs.allocation.choose -> b gets
    them, fails)."""
    allocation = allocate(Two().eval(), Stub(), r"^(a|b)$", config(bits=1.25), progress=False)
    assert allocation.settings == {"a": HIGH, "b": LOW}
    assert allocation.bits == pytest.approx(1.25)
    errors = {n: c.weight_error for n, c in allocation.layers.items()}
    assert errors["a"] < 0.02 < errors["b"]


def test_choose_spends_the_budget_where_the_estimate_falls_most():
    """Three equal layers, budget for one at the high setting: it goes to the layer with the largest sensitivity
    x gain; with a budget for all three, all get it; below the cheapest settings, None."""
    errors = {n: {LOW: 0.2, HIGH: 0.05} for n in "xyz"}
    weights = dict.fromkeys("xyz", 1024)
    sens = {"x": 1.0, "y": 3.0, "z": 2.0}
    assert choose(errors, sens, weights, (2 + 0.5 + 0.5) / 3) == {"x": LOW, "y": HIGH, "z": LOW}
    assert choose(errors, sens, weights, 2.0) == dict.fromkeys("xyz", HIGH)
    assert choose(errors, sens, weights, 0.4) is None


def test_a_residual_setting_is_measured_as_its_stages_and_can_win():
    """Settings k16 d8 (0.5 bits), k16 d8 x2 (1 bit, two residual stages) and k16 d2 (2 bits), budget 0.75 bits:
    the sensitive layer a gets the residual setting, whose weight error is measured on the residual layer (below
    the one-stage k16 d8's: mutation "the estimate fits a residual setting as one stage" -> equal errors, fails)."""
    residual = Setting(16, 8, 2)
    c = config(bits=0.75, bits_settings="16x8,16x8x2,16x2")
    allocation = allocate(Two().eval(), Stub(), r"^(a|b)$", c, progress=False)
    assert allocation.settings == {"a": residual, "b": LOW}
    assert allocation.bits == pytest.approx(0.75)
    errors = weight_errors({"b": Two().b}, [LOW, residual], {"b": 1}, seed=0, fit=WeightFit(iters=5))["b"]
    assert errors[residual] < 0.7 * errors[LOW]


class Stack(nn.Module):
    """Two blocks and a head: block 0 holds a (output x 10) and b (x 0.1), block 1 holds c alone, each block adds its
    Linears to the residual stream; head, outside the blocks, is the prediction."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.blocks = nn.ModuleList([Pair(gen), Single(gen)])
        self.head = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(WIDTH) + 0.01 * torch.randn(WIDTH, WIDTH, generator=gen))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Pair(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.a, self.b = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            for m in (self.a, self.b):
                m.weight.copy_(torch.randn(WIDTH, WIDTH, generator=gen) / WIDTH**0.5)

    def forward(self, x):
        return x + 10 * self.a(x) + 0.1 * self.b(x)


class Single(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.c = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            self.c.weight.copy_(torch.randn(WIDTH, WIDTH, generator=gen) / WIDTH**0.5)

    def forward(self, x):
        return x + self.c(x)


class StackStub(Stub):
    def blocks(self, model):
        return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]


def test_block_probes_match_the_per_layer_probes_where_a_block_error_reaches_the_prediction_alike():
    """--bits-probe block against the per-layer probes (the slow, direct reference), on a model whose blocks add to
    a residual stream that the prediction passes on nearly unchanged: c, alone in its block, gets the per-layer
    value to the bit (the same noise draw and the same whole-model pass); a and b, split by block 0's own output
    errors, within 10% (the two layers' noise adds with a small cross term); head, outside the blocks, is probed
    with the whole model. Catches a block's total given to each of its layers (a and b both get it), a split by
    weight error rather than output error (b, scaled down 100 times, then about equal to a), the per-block pass
    missing (every a_l 0), and the model left perturbed."""
    from vq4dit.calib.sensitivity import block_sensitivities

    model, c = Stack().eval(), config(bits=1.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probes = probe_calls(model, StackStub(), c.teacher, 0, "cpu")
    reference = noise_sensitivities(probes, ["blocks.0.a", "blocks.0.b", "blocks.1.c"])
    by_block = block_sensitivities(probes, ["blocks.0.a", "blocks.0.b", "blocks.1.c", "head"])
    assert sorted(by_block) == ["blocks.0.a", "blocks.0.b", "blocks.1.c"]  # head is left to the caller
    assert by_block["blocks.1.c"] == reference["blocks.1.c"]
    for name in ("blocks.0.a", "blocks.0.b"):
        assert by_block[name] == pytest.approx(reference[name], rel=0.1), name
    assert by_block["blocks.0.a"] > 1000 * by_block["blocks.0.b"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    allocation = allocate(model, StackStub(), r"^(blocks\.0\.[ab]|head)$", config(bits=1.0, bits_probe="block"),
                          progress=False)
    assert allocation.layers["head"].sensitivity > 0 and allocation.settings["blocks.0.a"] == HIGH


def test_a_budget_above_every_setting_is_warned_about():
    """--bits 100 with settings of at most 3 bits per weight was accepted without a word, its card saying --bits
    100 (a fourth new user's trial): the run and the dry run now warn (mutations: the warning never made; made at
    a budget the largest setting spends exactly)."""
    from vq4dit.jobs.allocation import budget_text, over_budget
    from vq4dit.jobs.config import load_config

    over = load_config(overrides={"bits": 100.0, "bits_settings": "256x4,64x2"})
    assert "--bits 100: above the 3 bits per weight of the largest setting" in over_budget(over.codebooks)
    assert budget_text(over).splitlines()[-1].startswith("warning: --bits 100: above")
    assert over_budget(load_config(overrides={"bits": 3.0, "bits_settings": "256x4,64x2"}).codebooks) is None
