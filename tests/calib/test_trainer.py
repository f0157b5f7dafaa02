"""The Trainer against a plain reference loop, exact resume from snapshots, and the authors' options
(codebooks frozen while soft, the running-minimum L_r gate)."""
import copy
import math

import pytest
import torch

from tests.calib.conftest import block_problem, soft_layer, tiny_config
from vq4dit.calib.train import (
    Minibatches,
    Trainer,
    minibatches,
    ratio_penalty,
    seeded_generator,
    train,
)


def reference_train(layers, loss_fn, num_points, config, generator):
    """The minibatch loop written out plainly (the default options): RMSprop on [soft logits] and [codebooks,
    biases], L_d + lambda_r * L_r, every 10 iterations freeze rows above select_threshold and harden layers with
    more than hard_fraction frozen, dropping their logits from the optimizer; argmax hardening at the end."""
    opt = torch.optim.RMSprop([
        {"params": [layer.logits for layer in layers if not layer.is_hard], "lr": config.lr_ratio},
        {"params": [layer.codebook for layer in layers] + [layer.bias for layer in layers], "lr": config.lr_codebook},
    ], alpha=config.rmsprop_alpha)
    batches = minibatches(num_points, config.batch_size, generator)
    for it in range(config.iters):
        if config.lr_schedule == "cosine":  # half a cosine from lr_codebook at the first update to ~0 at the last
            opt.param_groups[1]["lr"] = config.lr_codebook * (1 + math.cos(math.pi * it / config.iters)) / 2
        loss = loss_fn(next(batches))
        penalty = ratio_penalty(layers, config.ratio_reg)
        if penalty is not None:
            loss = loss + config.lambda_r * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % 10 == 0:
            for layer in layers:
                if not layer.is_hard:
                    layer.frozen |= torch.softmax(layer.logits.detach(), 1).amax(1) > config.select_threshold
                    if layer.frozen.float().mean().item() > config.hard_fraction:
                        opt.state.pop(layer.logits, None)
                        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"]
                                                         if p is not layer.logits]
                        layer.harden()
    for layer in layers:
        layer.harden()


def layer_states(layers):
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]


def assert_same_states(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def staggered_problem():
    """block_problem whose first layer starts near one-hot (hardened by the first selection) while the others
    harden around iteration 30 under STAGGERED: hardening happens at several moments of one run."""
    layers, loss_fn, error = block_problem()
    with torch.no_grad():
        layers[0].logits[:, 0] += 10.0
    return layers, loss_fn, error


STAGGERED = dict(iters=40, batch_size=8, lambda_r=1.0, lr_ratio=0.08, hard_fraction=0.5)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_train_matches_the_plain_loop_bitwise(schedule):
    config = tiny_config(**STAGGERED, lr_schedule=schedule).calibration
    layers, loss_fn, _ = staggered_problem()
    info = train(layers, loss_fn, Minibatches(64, config.batch_size, seeded_generator(0)), config)
    assert any(h is not None for h in info["hardened_at"])  # selection hardened layers mid-run
    ref_layers, ref_loss_fn, _ = staggered_problem()
    reference_train(ref_layers, ref_loss_fn, 64, config, seeded_generator(0))
    assert_same_states(layer_states(layers), layer_states(ref_layers))


@pytest.mark.parametrize("options", [{}, {"train_codebooks": "when_hard", "ratio_gate": "running_min",
                                          "select_every": 1}, {"lr_schedule": "cosine"}])
def test_train_resumes_exactly_from_a_snapshot(options):
    """Killed after its checkpoint at iteration 20, with some layers hardened before it and some after, a run
    resumed from that snapshot ends with the same layers and info as the uninterrupted run."""
    config = tiny_config(**STAGGERED, **options).calibration
    layers, loss_fn, _ = staggered_problem()
    saved = {}

    def keep(snapshot):
        if snapshot["iteration"] == 20:
            saved["snapshot"], saved["layers"] = copy.deepcopy(snapshot), layer_states(layers)

    batches = Minibatches(64, config.batch_size, seeded_generator(0))
    whole = train(layers, loss_fn, batches, config, on_checkpoint=keep)
    assert any(h is not None and h <= 20 for h in whole["hardened_at"])
    assert any(h is None or h > 20 for h in whole["hardened_at"])
    again, again_loss_fn, _ = staggered_problem()
    for layer, state in zip(again, saved["layers"]):
        if "indices" in state:
            layer.harden()
        layer.load_state_dict(state)
    resumed = train(again, again_loss_fn, Minibatches(64, config.batch_size, seeded_generator(0)), config,
                    resume=saved["snapshot"])
    assert_same_states(layer_states(layers), layer_states(again))
    assert resumed == whole


def test_codebooks_train_only_once_their_layer_is_hard():
    """train_codebooks="when_hard": a soft layer's codebook gets no gradient and no update, it trains once its
    layer hardens; biases and hard-from-the-start codebooks train from the first update."""
    config = tiny_config(train_codebooks="when_hard", select_every=1, hard_fraction=0.5, lr_codebook=1e-2).calibration
    confident, _ = soft_layer(seed=0)
    undecided, _ = soft_layer(seed=1)
    hard, _ = soft_layer(seed=2)
    hard.harden()
    with torch.no_grad():
        confident.logits.copy_(torch.tensor([10.0, 0.0]))  # every ratio > 0.99: hardened by the first selection
        undecided.logits.zero_()  # r = 1/2: stays soft
    layers = [confident, undecided, hard]
    trainer = Trainer(layers, config)
    x = torch.randn(16, 8)

    def loss_d():
        return sum(layer(x).pow(2).mean() for layer in layers)

    start = [layer.codebook.detach().clone() for layer in layers]
    bias = undecided.bias.detach().clone()
    assert trainer.step(loss_d()) == [0]  # the update ran with `confident` soft, then selection hardened it
    assert confident.codebook.grad is None and undecided.codebook.grad is None
    assert hard.codebook.grad is not None and hard.codebook.grad.abs().sum() > 0
    assert torch.equal(confident.codebook, start[0]) and torch.equal(undecided.codebook, start[1])
    assert not torch.equal(hard.codebook, start[2]) and not torch.equal(undecided.bias, bias)
    trainer.step(loss_d())
    assert confident.codebook.grad.abs().sum() > 0 and not torch.equal(confident.codebook, start[0])
    assert undecided.codebook.grad is None and torch.equal(undecided.codebook, start[1])
    trainer.finish()
    assert all(layer.is_hard and layer.codebook.requires_grad for layer in layers)


def logits_for_penalty(value):
    """(1, 2) logits whose n = 2 code-form penalty 2 r (1 - r) equals `value` (<= 0.5)."""
    r = (1 + (1 - 2 * value) ** 0.5) / 2
    return torch.tensor([[float(torch.logit(torch.tensor(r, dtype=torch.float64))), 0.0]])


@pytest.mark.parametrize("gate", ["none", "running_min"])
def test_ratio_gate_adds_the_penalty_only_above_its_running_minimum(gate):
    """ratio_gate="running_min": lambda_r * L_r joins an update only when L_r is strictly above the smallest L_r
    seen earlier in the trajectory; new_trajectory() forgets that minimum. L_d has zero gradient here, so the
    logits move exactly when L_r was added."""
    config = tiny_config(ratio_gate=gate, lambda_r=1.0, select_every=1000).calibration
    layer, _ = soft_layer(seed=0)
    trainer = Trainer([layer], config)
    # (L_r set before the update, added under running_min?); None marks new_trajectory()
    plan = [(0.30, False), (0.20, False), (0.25, True), (0.20, False), (0.22, True), None, (0.25, False),
            (0.24, False), (0.28, True)]
    for entry in plan:
        if entry is None:
            trainer.new_trajectory()
            continue
        value, added = entry
        with torch.no_grad():
            layer.logits.copy_(logits_for_penalty(value).expand_as(layer.logits))
        assert ratio_penalty([layer]).item() == pytest.approx(value, rel=1e-4)
        before = layer.logits.detach().clone()
        trainer.step(0.0 * layer.weight().sum())
        moved = not torch.equal(layer.logits, before)
        assert moved == (added or gate == "none"), (value, trainer.ratio_min)
    resumed = Trainer([layer], config, resume=copy.deepcopy(trainer.snapshot()))
    assert resumed.ratio_min == trainer.ratio_min == (pytest.approx(0.24, rel=1e-4) if gate == "running_min" else None)
