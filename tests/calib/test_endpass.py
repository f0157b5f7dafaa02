"""The end-to-end pass after the block-wise walk (calib/endpass.py, issue 19 lever d)."""
import json
import logging

import pytest
import torch

import vq4dit.calib.endpass
import vq4dit.calib.train
from tests.calib.conftest import calib_log, quantized_pair, reference_points, run_calibration, tiny_config
from vq4dit.calib.checkpoints import STATE_DIR, resume_point
from vq4dit.calib.endpass import EndPoints
from vq4dit.models.adapters import adapter_for
from vq4dit.utils.errors import UserError

DEPTH = 3


def calibrated(tmp_path, **overrides):
    """(student, teacher, {name: layer}, the e2e log record or None) of a tiny 3-block run."""
    config = tiny_config(iters=20, calib_samples=4, **overrides)
    student, teacher, qlayers = quantized_pair(config, DEPTH)
    run_calibration(student, teacher, adapter_for(student), qlayers, config, str(tmp_path))
    records = calib_log(tmp_path)
    return student, teacher, qlayers, next((r for r in records if r["mode"] == "e2e"), None)


@torch.no_grad()
def model_error(student, teacher):
    """MSE of the whole model's output vs the teacher's on held-out sampler points: a plain loop, no replay."""
    x, t, y = reference_points(teacher, 6, 5, 3, 1.0, seed=99, batch_size=6)
    return (student(x, t, y) - teacher(x, t, y)).pow(2).mean().item()


def test_the_pass_lowers_the_chain_end_and_the_whole_model_error_with_assignments_fixed(tmp_path):
    """Against the same run without the pass: the logged chain-end error falls by a margin, the whole model's
    held-out output error falls, and only codebooks and biases moved (the indices are the walk's). Catches a zero
    learning rate (nothing moves: not kept), a loss on the wrong block, and a pass that trains the assignments."""
    walk_student, teacher, walk, none = calibrated(tmp_path / "walk", lr_codebook=1e-3)
    student, _, passed, record = calibrated(tmp_path / "e2e", lr_codebook=1e-3, e2e_iters=40)
    assert none is None and record["kept"] and record["updates"] == 40
    assert record["mse_after"] < 0.9 * record["mse_before"]
    assert model_error(student, teacher) < model_error(walk_student, teacher)
    assert all(layer.is_hard and torch.equal(layer.indices, walk[n].indices) for n, layer in passed.items())
    assert any(not torch.equal(layer.codebook, walk[n].codebook) for n, layer in passed.items())


def test_a_pass_that_raises_the_error_is_undone(tmp_path, caplog):
    """A learning rate 10^4 x the default wrecks the codebooks in the pass: the walk's layers stay, bitwise, with a
    warning. Catches the rollback skipped or inverted."""
    _, _, walk, _ = calibrated(tmp_path / "walk", lr_codebook=1e-3)
    with caplog.at_level(logging.WARNING, logger="vq4dit.calib.endpass"):
        _, _, passed, record = calibrated(tmp_path / "bad", lr_codebook=1e-3, e2e_iters=10, e2e_lr=1.0)
    assert not record["kept"] and record["mse_after"] == record["mse_before"]
    assert "the end-to-end pass raised the chain's end error" in caplog.text
    assert all(torch.equal(layer.codebook, walk[n].codebook) for n, layer in passed.items())


def test_the_pass_ends_in_the_best_state_it_measured(tmp_path, monkeypatch):
    """Measured every 10 updates, with the late rise built in rather than hoped for: the learning rate is 1e-3 for
    the first 30 updates and 1.0 after (which wrecks the codebooks, as in the rollback test), so the error is lowest
    at or before update 30 and far higher at 60. The layers end in the best measured state (codebooks then rounded
    to fp16: within 1% of its error), not the last. Catches the last state kept, and every measurement taken as
    best."""
    monkeypatch.setattr(vq4dit.calib.endpass, "E2E_CHECK", 10)
    monkeypatch.setattr(vq4dit.calib.train, "codebook_lr",
                        lambda config, update: config.lr_codebook if update < 30 else 1.0)
    _, _, _, record = calibrated(tmp_path, e2e_iters=60, e2e_lr=1e-3)
    updates, errors = zip(*record["errors"])
    assert updates == (0, 10, 20, 30, 40, 50, 60)
    best = min(errors)
    assert record["kept"] and 0 < record["best_at"] == updates[errors.index(best)] <= 30
    assert abs(record["mse_after"] - best) <= 0.01 * best < errors[-1] - 0.01 * best


def test_interrupted_pass_resumes_from_the_walk_to_the_same_layers(tmp_path, monkeypatch):
    """Killed during the pass, a rerun restores the finished walk (no block trains again) and runs the pass:
    bitwise the uninterrupted run's layers. Catches the walk's last save marked complete (the pass skipped) and
    the pass's points not saved with the walk."""
    _, _, whole, _ = calibrated(tmp_path / "whole", e2e_iters=20)
    original = vq4dit.calib.endpass.train

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vq4dit.calib.endpass, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        calibrated(tmp_path / "split", e2e_iters=20)
    assert resume_point(tmp_path / "split") == "the end-to-end pass"
    saved = json.loads((tmp_path / "split" / STATE_DIR / "state.json").read_text())
    assert saved["next_block"] == DEPTH and not saved["complete"]
    monkeypatch.setattr(vq4dit.calib.endpass, "train", original)
    monkeypatch.setattr("vq4dit.calib.blockwise.calibrate_block", None)  # a block that trained again would fail
    _, _, resumed, record = calibrated(tmp_path / "split", e2e_iters=20)
    assert record is not None and record["kept"]
    assert all(torch.equal(whole[n].codebook, resumed[n].codebook) for n in whole)
    assert all(torch.equal(whole[n].bias, resumed[n].bias) for n in whole if whole[n].bias is not None)


def test_points_are_spread_over_the_set_and_round_trip():
    """EndPoints.take: evenly spaced rows (every trajectory batch and step), batched slots cut, constants kept as
    copies (a checkpoint saves them beside the walk's slots: safetensors refuses a tensor twice, which stopped every
    --e2e-iters run of a model with constant block inputs, Flux's or Qwen-Image's rotary tables, at its first
    checkpoint); to_tensors/from_tensors give them back."""
    from safetensors.torch import save

    from vq4dit.calib.capture import CalibrationSet

    slots = {"s0.0": torch.arange(10.0)[:, None], "s0.1": torch.ones(3)}
    cset = CalibrationSet([], slots, {"s0.0": True, "s0.1": False}, 10)
    points = EndPoints.take(cset, count=4)
    assert points.rows.tolist() == [0, 2, 5, 7]
    assert points.slots["s0.0"].squeeze(1).tolist() == [0, 2, 5, 7] and torch.equal(points.slots["s0.1"], slots["s0.1"])
    save({**{f"shared/{k}": t for k, t in slots.items()}, **points.to_tensors()})  # as a checkpoint does
    points.set_targets([torch.arange(10.0) * 2])
    back = EndPoints.from_tensors({"fp/o0.0": torch.zeros(1), **points.to_tensors()}, cset.batched)
    assert torch.equal(back.rows, points.rows) and torch.equal(back.targets[0], torch.tensor([0.0, 4, 10, 14]))
    assert back.slots.keys() == points.slots.keys()
    assert EndPoints.from_tensors({"fp/o0.0": torch.zeros(1)}, cset.batched) is None


def test_a_process_takes_the_single_processs_points_it_holds_and_they_round_trip():
    """Under torchrun (a RowShard on the set): the process holding global rows 0-2 and 6-8 of 10 keeps those of the
    single process's points [0, 2, 5, 7] it holds (0, 2 and 7, at its local rows 0, 2 and 4) and knows which of the
    4 they are (the 1st, 2nd and 4th); to_tensors/from_tensors give the shard back (a resumed process must not take
    them as all 4).
    Catches the points taken over the process's own rows as if they were all, and the shard lost on resume."""
    from vq4dit.calib.capture import CalibrationSet
    from vq4dit.utils.distributed import RowShard

    mine = torch.tensor([0, 1, 2, 6, 7, 8])
    cset = CalibrationSet([], {"s0.0": mine[:, None].float()}, {"s0.0": True}, 6, RowShard(mine, 10))
    points = EndPoints.take(cset, count=4)
    assert points.rows.tolist() == [0, 2, 4] and points.slots["s0.0"].squeeze(1).tolist() == [0, 2, 7]
    assert points.shard.rows.tolist() == [0, 1, 3] and points.shard.total == 4
    back = EndPoints.from_tensors(points.to_tensors(), cset.batched)
    assert torch.equal(back.shard.rows, points.shard.rows) and back.shard.total == 4
    assert EndPoints.from_tensors(EndPoints.take(CalibrationSet([], cset.slots, cset.batched, 6)).to_tensors(),
                                  cset.batched).shard is None


@pytest.mark.parametrize("calib_mode", ["joint", "online"])
def test_the_pass_follows_the_blockwise_walk_only(calib_mode):
    with pytest.raises(UserError, match="e2e_iters=5.*block-wise walk only"):
        tiny_config(calib=calib_mode, e2e_iters=5)
