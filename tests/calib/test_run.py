import itertools
import json
import logging

import pytest
import torch

import calib.blockwise
import calib.joint
from calib.inputs import embed_inputs, teacher_inputs
from calib.run import calibrate
from calib.state import STATE_DIR
from tests.calib.conftest import quantized_pair, tiny_config
from utils.errors import UserError


def run(config, out_dir, depth=2):
    student, teacher, qlayers = quantized_pair(config, depth)
    stats = calibrate(student, qlayers, config, str(out_dir), teacher=teacher, progress=False)
    return student, teacher, qlayers, stats


def state_of(qlayers):
    return {f"{name}.{k}": v for name, layer in qlayers.items() for k, v in layer.state_dict().items()}


def without_time(stats):
    return [{k: v for k, v in s.items() if k != "seconds"} for s in stats]


@pytest.mark.parametrize("method,calib_mode,inputs", [
    ("vq4dit", "blockwise", "quantized"), ("vq4dit", "blockwise", "fp"), ("codebook", "blockwise", "quantized"),
    ("vq4dit", "joint", "quantized"),
])
def test_calibration_lowers_block_error_and_hardens(tmp_path, method, calib_mode, inputs):
    config = tiny_config(method=method, calib=calib_mode, block_inputs=inputs, iters=40, lambda_r=0.1,
                         lr_codebook=1e-3)
    _, _, qlayers, stats = run(config, tmp_path)
    assert all(layer.is_hard for layer in qlayers.values())
    assert [s["block"] for s in stats] == [0, 1]
    assert sum(s["mse_after"] for s in stats) < sum(s["mse_before"] for s in stats)
    lines = (tmp_path / "calib_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["block"] for line in lines] == [0, 1]


def test_block_inputs_are_the_quantized_or_fp_chain(tmp_path, monkeypatch):
    """Block i's calibration inputs: the calibrated quantized blocks < i (sequential) or the FP blocks < i."""
    original = calib.blockwise.calibrate_block
    for mode in ("quantized", "fp"):
        config = tiny_config(block_inputs=mode, iters=10)
        student, teacher, qlayers = quantized_pair(config, depth=3)
        seen = {}

        def spy(block, layers, fp_weights, x_in, c, target, *args, index=0, **kwargs):
            seen[index] = (x_in.clone(), target.clone())
            return original(block, layers, fp_weights, x_in, c, target, *args, index=index, **kwargs)

        monkeypatch.setattr(calib.blockwise, "calibrate_block", spy)
        calibrate(student, qlayers, config, str(tmp_path / mode), teacher=teacher, progress=False)
        x, t, y = teacher_inputs(teacher, config.calib_samples, config.calib_timesteps, config.steps,
                                 config.cfg_scale, config.seed, "cpu")
        tokens, c = embed_inputs(teacher, x, t, y, "cpu")
        h, h_fp = tokens.float(), tokens.float()
        with torch.no_grad():
            for i in range(3):
                x_in, target = seen[i]
                torch.testing.assert_close(x_in.float(), h if mode == "quantized" else h_fp, atol=5e-3, rtol=5e-3)
                h_fp = teacher.blocks[i](h_fp, c)
                h = student.blocks[i](h, c)  # the calibrated (hard) block
                torch.testing.assert_close(target.float(), h_fp, atol=5e-3, rtol=5e-3)
        assert not torch.allclose(h, h_fp, atol=1e-4)  # the two chains do differ


def test_resume_after_interrupt_is_byte_identical(tmp_path, monkeypatch, caplog):
    config = tiny_config(iters=20)
    _, _, whole, whole_stats = run(config, tmp_path / "whole", depth=3)

    original = calib.blockwise.calibrate_block

    def killed_at_block_2(*args, index=0, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        return original(*args, index=index, **kwargs)

    monkeypatch.setattr(calib.blockwise, "calibrate_block", killed_at_block_2)
    with caplog.at_level(logging.WARNING, logger="calib.run"), pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "split", depth=3)
    assert "resume at block 2" in caplog.text
    saved = json.loads((tmp_path / "split" / STATE_DIR / "state.json").read_text())
    assert saved["next_block"] == 2
    monkeypatch.setattr(calib.blockwise, "calibrate_block", original)
    _, _, resumed, resumed_stats = run(config, tmp_path / "split", depth=3)
    a, b = state_of(whole), state_of(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(resumed_stats) == without_time(whole_stats)
    log = [json.loads(line)["block"] for line in (tmp_path / "split" / "calib_log.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2]


def test_joint_resume_mid_training_is_byte_identical(tmp_path, monkeypatch, caplog):
    """A joint run killed mid-training resumes from its last checkpoint (layers half soft, half hardened,
    RMSprop state, minibatch position) to the same layers and stats as an uninterrupted run."""
    monkeypatch.setattr(calib.joint, "CHECKPOINT_SECONDS", 0)  # a checkpoint every SELECT_EVERY iterations
    config = tiny_config(calib="joint", iters=60, lambda_r=1.0, hard_fraction=0.2, lr_codebook=1e-3)
    _, _, whole, whole_stats = run(config, tmp_path / "whole")
    hardened_at = [layer["hardened_at"] for s in whole_stats for layer in s["layers"].values()]
    assert any(h is not None and 0 < h <= 40 for h in hardened_at)  # some layers harden before the checkpoint
    assert any(h is None or h > 40 for h in hardened_at)  # and some after it

    original = calib.joint.train

    def killed_at_iteration_45(layers, loss_fn, *args, **kwargs):
        calls = itertools.count()

        def dying(idx):
            if next(calls) == 45:
                raise KeyboardInterrupt
            return loss_fn(idx)
        return original(layers, dying, *args, **kwargs)

    monkeypatch.setattr(calib.joint, "train", killed_at_iteration_45)
    with caplog.at_level(logging.INFO, logger="calib.run"), pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "split")
    assert "resume at joint iteration 40" in caplog.text
    monkeypatch.setattr(calib.joint, "train", original)
    with caplog.at_level(logging.INFO, logger="calib.run"):
        _, _, resumed, resumed_stats = run(config, tmp_path / "split")
    assert "resuming joint calibration at iteration 40 of 60" in caplog.text
    a, b = state_of(whole), state_of(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(resumed_stats) == without_time(whole_stats)


def test_finished_state_returns_without_work(tmp_path, monkeypatch):
    config = tiny_config(iters=10)
    _, _, first, stats = run(config, tmp_path)
    monkeypatch.setattr(calib.blockwise, "calibrate_block", None)  # any calibration would fail
    _, _, again, again_stats = run(config, tmp_path)
    a, b = state_of(first), state_of(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again_stats == json.loads(json.dumps(stats))


def test_changed_config_is_a_user_error(tmp_path):
    run(tiny_config(iters=10), tmp_path)
    with pytest.raises(UserError, match="different config.*fresh --out or delete"):
        run(tiny_config(iters=11), tmp_path)


def test_resuming_may_name_the_device_differently(tmp_path):
    run(tiny_config(iters=10, device="cpu"), tmp_path)
    _, _, again, _ = run(tiny_config(iters=10, device="auto"), tmp_path)  # the finished state is accepted
    assert all(layer.is_hard for layer in again.values())


def test_deterministic_for_a_seed(tmp_path):
    _, _, a, _ = run(tiny_config(iters=15), tmp_path / "a")
    _, _, b, _ = run(tiny_config(iters=15), tmp_path / "b")
    _, _, c, _ = run(tiny_config(iters=15, seed=1), tmp_path / "c")
    sa, sb, sc = state_of(a), state_of(b), state_of(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
