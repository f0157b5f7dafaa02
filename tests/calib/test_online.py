"""Online calibration (the authors' recipe): one update per teacher sampler step, on the core's recorded calls."""
import itertools
import json
import logging

import pytest
import torch

import vq4dit.calib.online
from tests.calib.conftest import calib_log, quantized_pair, run_calibration, tiny_config
from vq4dit.calib.checkpoints import STATE_DIR, resume_point
from vq4dit.models.adapters import adapter_for


def authors_config(**overrides):
    values = dict(calib="online", calib_samples=3, online_batch=2, steps=5, cfg_scale=4.0, lambda_r=1.0,
                  ratio_gate="running_min", train_codebooks="when_hard", select_every=1)
    values.update(overrides)
    return tiny_config(**values)


def run(config, out_dir, depth=2):
    student, teacher, qlayers = quantized_pair(config, depth)
    stats = run_calibration(student, teacher, adapter_for(student), qlayers, config, str(out_dir))
    return student, teacher, qlayers, stats


def test_one_update_per_teacher_step_and_a_new_trajectory_per_batch(tmp_path, monkeypatch):
    steps, trajectories = [], []
    original_step, original_new = vq4dit.calib.online.Trainer.step, vq4dit.calib.online.Trainer.new_trajectory
    monkeypatch.setattr(vq4dit.calib.online.Trainer, "step", lambda self, loss: steps.append(loss.item()) or
                        original_step(self, loss))
    monkeypatch.setattr(vq4dit.calib.online.Trainer, "new_trajectory", lambda self: trajectories.append(self.updates) or
                        original_new(self))
    _, _, qlayers, stats = run(authors_config(), tmp_path)
    assert len(steps) == 3 * 5 and trajectories == [0, 5, 10]  # 3 trajectories x 5 sampler steps
    assert all(layer.is_hard for layer in qlayers.values())
    assert stats[0]["updates"] == 15 and [s["block"] for s in stats] == [0, 1]
    log = calib_log(tmp_path)
    assert [r["mode"] for r in log] == ["online", "online"]


def test_the_loss_is_the_mean_block_error_of_the_two_chains(tmp_path, monkeypatch):
    """Each update's L_d: mean over blocks of MSE(student block, fed by student blocks; teacher block, fed by teacher
    blocks), both from the teacher's current sampler inputs."""
    expected, actual = [], []
    original_outputs, original_step = vq4dit.calib.online.student_outputs, vq4dit.calib.online.Trainer.step

    def spy_outputs(model, blocks, args, kwargs):
        with torch.no_grad():
            h, c = model.embed(*args)
            h_fp, errors = h, []
            for block, fp_block in zip(model.blocks, teacher.blocks):
                h, h_fp = block(h, c), fp_block(h_fp, c)
                errors.append((h - h_fp).pow(2).mean())
        expected.append(torch.stack(errors).mean().item())
        return original_outputs(model, blocks, args, kwargs)

    monkeypatch.setattr(vq4dit.calib.online, "student_outputs", spy_outputs)
    monkeypatch.setattr(vq4dit.calib.online.Trainer, "step", lambda self, loss: actual.append(loss.item()) or
                        original_step(self, loss))
    config = authors_config(calib_samples=2, steps=3, calib_timesteps=2)
    student, teacher, qlayers = quantized_pair(config, 2)
    run_calibration(student, teacher, adapter_for(student), qlayers, config, str(tmp_path))
    assert len(actual) == 6 and actual == pytest.approx(expected, rel=1e-5)


def test_soft_layers_keep_their_k_means_codebooks(tmp_path):
    """train_codebooks when_hard: a layer that never hardens before the end never updates its codebook."""
    config = authors_config(hard_fraction=1.0)  # no layer hardens during training
    student, _, qlayers, stats = run(config, tmp_path)
    _, _, fresh = quantized_pair(config, 2)
    for name, layer in qlayers.items():
        assert torch.equal(layer.codebook, fresh[name].codebook.half().float()), name
    assert all(s["hardened_at"] is None for st in stats for s in st["layers"].values())


def test_label_dropout_replaces_labels_by_the_null_class():
    model, _, _ = quantized_pair(tiny_config(), 1)
    adapter = adapter_for(model)
    y = torch.arange(10).repeat(100)
    args, _ = adapter.drop_labels(model, (None, None, y), {}, 0.3, torch.Generator().manual_seed(0))
    dropped = args[2] == model.num_classes
    assert 200 < dropped.sum() < 400 and torch.equal(args[2][~dropped], y[~dropped])
    again, _ = adapter.drop_labels(model, (None, None, y), {}, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again[2], args[2])


def test_online_resume_after_a_kill_is_byte_identical(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(vq4dit.calib.online, "CHECKPOINT_SECONDS", 0)  # a checkpoint after every trajectory
    config = authors_config(calib_samples=4, student_label_dropout=0.2)
    _, _, whole, whole_stats = run(config, tmp_path / "whole")
    original = vq4dit.calib.online.Trainer.step
    calls = itertools.count()

    def dying(self, loss):
        if next(calls) == 12:  # inside trajectory 2 (updates 10..14)
            raise KeyboardInterrupt
        return original(self, loss)

    monkeypatch.setattr(vq4dit.calib.online.Trainer, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "split")
    assert resume_point(tmp_path / "split") == "online trajectory 2"
    assert json.loads((tmp_path / "split" / STATE_DIR / "state.json").read_text())["train_state"]["trajectory"] == 2
    monkeypatch.setattr(vq4dit.calib.online.Trainer, "step", original)
    with caplog.at_level(logging.INFO, logger="vq4dit.calib.modes"):
        _, _, resumed, resumed_stats = run(config, tmp_path / "split")
    assert "resuming calibration at online trajectory 2" in caplog.text
    for name in whole:
        a, b = whole[name].state_dict(), resumed[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [s["mse_after"] for s in resumed_stats] == [s["mse_after"] for s in whole_stats]
