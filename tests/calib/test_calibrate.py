import copy
import itertools
import json
import logging

import pytest
import torch

import vq4dit.calib.blockwise
import vq4dit.calib.joint
from tests.calib.conftest import calib_log, quantized_pair, reference_points, run_calibration, tiny_config, tiny_dit
from vq4dit.calib.checkpoints import STATE_DIR, resume_point
from vq4dit.calib.tables import Out, ref_of
from vq4dit.jobs.methods import method_for
from vq4dit.models.adapters import adapter_for
from vq4dit.utils.errors import UserError
from vq4dit.vq.apply import BLOCK_LINEARS


def run(config, out_dir, depth=2):
    student, teacher, qlayers = quantized_pair(config, depth)
    stats = run_calibration(student, teacher, adapter_for(student), qlayers, config, str(out_dir))
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
    assert [r["block"] for r in calib_log(tmp_path)] == [0, 1]


def test_block_inputs_are_the_quantized_or_fp_chain(tmp_path, monkeypatch):
    """Block i's calibration inputs: the calibrated quantized blocks < i (sequential) or the FP blocks < i; its
    targets: the FP blocks <= i, all from the points a plain DiT sampling loop visits."""
    original = vq4dit.calib.blockwise.calibrate_block
    for mode in ("quantized", "fp"):
        config = tiny_config(block_inputs=mode, iters=10)
        student, teacher, qlayers = quantized_pair(config, depth=3)
        seen = {}

        def spy(problem, i, replay, targets, config, shard=None):
            ref = ref_of(replay.call.inputs["dict"]["args"]["list"][0])
            seen[i] = (replay.table[ref].clone(), targets[0].clone())
            return original(problem, i, replay, targets, config, shard)

        monkeypatch.setattr(vq4dit.calib.blockwise, "calibrate_block", spy)
        run_calibration(student, teacher, adapter_for(student), qlayers, config, str(tmp_path / mode))
        tc = config.teacher
        x, t, y = reference_points(teacher, tc.calib_samples, tc.steps, tc.calib_timesteps, tc.cfg_scale, config.seed,
                                   batch_size=64)
        with torch.no_grad():
            tokens, c = teacher.embed(x, t, y)
            h, h_fp = tokens.half().float(), tokens.half().float()
            for i in range(3):
                x_in, target = seen[i]
                torch.testing.assert_close(x_in.float(), h if mode == "quantized" else h_fp, atol=5e-3, rtol=5e-3)
                h_fp = teacher.blocks[i](h_fp, c)
                h = student.blocks[i](h, c)  # the calibrated (hard) block
                torch.testing.assert_close(target.float(), h_fp, atol=5e-3, rtol=5e-3)
        assert not torch.allclose(h, h_fp, atol=1e-4)  # the two chains do differ


def test_resume_after_interrupt_is_byte_identical(tmp_path, monkeypatch):
    config = tiny_config(iters=20)
    _, _, whole, whole_stats = run(config, tmp_path / "whole", depth=3)

    original = vq4dit.calib.blockwise.calibrate_block

    def killed_at_block_2(problem, i, *args):
        if i == 2:
            raise KeyboardInterrupt
        return original(problem, i, *args)

    monkeypatch.setattr(vq4dit.calib.blockwise, "calibrate_block", killed_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "split", depth=3)
    assert resume_point(tmp_path / "split") == "block 2"  # what quantize.py's last line says
    saved = json.loads((tmp_path / "split" / STATE_DIR / "state.json").read_text())
    assert saved["next_block"] == 2
    monkeypatch.setattr(vq4dit.calib.blockwise, "calibrate_block", original)
    _, _, resumed, resumed_stats = run(config, tmp_path / "split", depth=3)
    a, b = state_of(whole), state_of(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(resumed_stats) == without_time(whole_stats)
    assert [r["block"] for r in calib_log(tmp_path / "split")] == [0, 1, 2]


def test_joint_resume_mid_training_is_byte_identical(tmp_path, monkeypatch, caplog):
    """A joint run killed mid-training resumes from its last checkpoint (layers half soft, half hardened,
    RMSprop state, minibatch position) to the same layers and stats as an uninterrupted run."""
    monkeypatch.setattr(vq4dit.calib.joint, "CHECKPOINT_SECONDS", 0)  # a checkpoint every SELECT_EVERY iterations
    config = tiny_config(calib="joint", iters=60, lambda_r=1.0, hard_fraction=0.2, lr_codebook=1e-3)
    _, _, whole, whole_stats = run(config, tmp_path / "whole")
    hardened_at = [layer["hardened_at"] for s in whole_stats for layer in s["layers"].values()]
    assert any(h is not None and 0 < h <= 40 for h in hardened_at)  # some layers harden before the checkpoint
    assert any(h is None or h > 40 for h in hardened_at)  # and some after it

    original = vq4dit.calib.joint.train

    def killed_at_iteration_45(layers, loss_fn, *args, **kwargs):
        calls = itertools.count()

        def dying(idx):
            if next(calls) == 45:
                raise KeyboardInterrupt
            return loss_fn(idx)
        return original(layers, dying, *args, **kwargs)

    monkeypatch.setattr(vq4dit.calib.joint, "train", killed_at_iteration_45)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "split")
    assert resume_point(tmp_path / "split").startswith("joint iteration 40 ")
    monkeypatch.setattr(vq4dit.calib.joint, "train", original)
    with caplog.at_level(logging.INFO, logger="vq4dit.calib.modes"):
        _, _, resumed, resumed_stats = run(config, tmp_path / "split")
    assert "resuming calibration at joint iteration 40" in caplog.text
    a, b = state_of(whole), state_of(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(resumed_stats) == without_time(whole_stats)


def test_finished_state_returns_without_work(tmp_path, monkeypatch):
    config = tiny_config(iters=10)
    _, _, first, stats = run(config, tmp_path)
    monkeypatch.setattr(vq4dit.calib.blockwise, "calibrate_block", None)  # any calibration would fail
    _, _, again, again_stats = run(config, tmp_path)
    a, b = state_of(first), state_of(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again_stats == json.loads(json.dumps(stats))


def test_changed_config_is_a_user_error(tmp_path):
    run(tiny_config(iters=10), tmp_path)
    with pytest.raises(UserError, match="config changed .*iters 10 -> 11.*new --out"):
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


def toy_pair(config):
    from tests.calib.toy import ToyAdapter, ToyTransformer
    from vq4dit.vq import CodebookSpec, quantize_linears

    teacher = ToyTransformer(depth=3).eval()
    student = copy.deepcopy(teacher)
    adapter = ToyAdapter()
    c = config.codebooks
    qlayers = quantize_linears(student, CodebookSpec(c.k, c.dim, c.candidates, c.kmeans_iters),
                               include=adapter.quant_include(student), seed=config.seed, progress=False)
    return student, teacher, adapter, qlayers


@pytest.mark.parametrize("calib_mode,inputs", [("blockwise", "quantized"), ("blockwise", "fp"),
                                               ("joint", "quantized")])
def test_two_stream_blocks_calibrate_through_the_same_core(tmp_path, calib_mode, inputs):
    """SD3 / Flux shaped blocks (keyword arguments, swapped tuple outputs, an unbatched table): every mode runs and
    lowers the block errors; both outputs of every block are matched."""
    config = tiny_config(codebook_size=8, calib=calib_mode, block_inputs=inputs, iters=60, lr_codebook=1e-3,
                         calib_samples=4, steps=4, calib_timesteps=2, cfg_scale=1.0)
    student, teacher, adapter, qlayers = toy_pair(config)
    assert len(qlayers) == 3 * 4
    stats = run_calibration(student, teacher, adapter, qlayers, config, str(tmp_path))
    assert [s["name"] for s in stats] == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    assert all(layer.is_hard for layer in qlayers.values())
    assert sum(s["mse_after"] for s in stats) < 0.8 * sum(s["mse_before"] for s in stats)


def test_activations_spilled_to_disk_give_the_same_calibration(tmp_path, caplog):
    """--max-cache-gb 0: every cached tensor is a memory-mapped file; the result is bitwise the in-memory one."""
    _, _, in_memory, stats = run(tiny_config(iters=15), tmp_path / "memory", depth=3)
    config = tiny_config(iters=15, max_cache_gb=0.0, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="vq4dit.calib.cache"):
        _, _, spilled, spilled_stats = run(config, tmp_path / "disk", depth=3)
    assert caplog.text.count("memory budget of 0.00 GiB reached") >= 3  # the recording, then block outputs
    a, b = state_of(in_memory), state_of(spilled)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(stats) == without_time(spilled_stats)
    assert not (tmp_path / "cache").exists()  # the files are gone once calibration ends, and the directory it made


def test_what_propagates_is_the_deployed_model(tmp_path, monkeypatch):
    """Calibrated = deployed: block i + 1 trains on block i's outputs with the codebooks the artifact stores (fp16),
    so the logged block errors are those of the saved model."""
    original = vq4dit.calib.blockwise.calibrate_block
    inputs = {}

    def spy(problem, i, replay, targets, config, shard=None):
        inputs[i] = {ref: v.clone() for ref, v in replay.table.items()}
        return original(problem, i, replay, targets, config, shard)

    monkeypatch.setattr(vq4dit.calib.blockwise, "calibrate_block", spy)
    config = tiny_config(iters=30, cache_dtype="fp32", lr_codebook=1e-2)
    student, teacher, qlayers, stats = run(config, tmp_path, depth=2)
    for layer in qlayers.values():
        layer.round_codebook_()  # what save_quantized stores
    with torch.no_grad():
        seen = inputs[0]
        deployed = student.blocks[0](seen["s0.0"], seen["s0.1"])
        error = (deployed - teacher.blocks[0](seen["s0.0"], seen["s0.1"])).pow(2).mean().item()
    torch.testing.assert_close(inputs[1][Out(0, 0)], deployed, rtol=1e-6, atol=1e-6)
    assert stats[0]["mse_after"] == pytest.approx(error, rel=1e-5)


def test_layers_softened_when_their_block_comes_calibrate_like_soft_ones(tmp_path):
    """The quantize job keeps layers hard until block-wise calibration reaches their block (0.25 instead of 2.75
    bytes per weight for the others); VQLinear.soften_ then gives them exactly the candidates and ratio logits that
    quantizing them soft gives, so the result is bitwise the same (from the k-means start: the output-aware one
    refits hard layers only, so an eager soft layer would skip it)."""
    from tests.calib.conftest import tiny_dit
    from vq4dit.vq import CodebookSpec, quantize_linears

    config = tiny_config(iters=15, codebook_init="kmeans")
    _, _, eager, eager_stats = run(config, tmp_path / "eager", depth=3)
    teacher = tiny_dit(3, 0)
    student = copy.deepcopy(teacher)
    c = config.codebooks
    lazy = quantize_linears(student, CodebookSpec(c.k, c.dim, c.candidates, c.kmeans_iters), seed=config.seed,
                            progress=False, soft=False)
    assert all(layer.is_hard for layer in lazy.values())
    lazy_stats = run_calibration(student, teacher, adapter_for(student), lazy, config, str(tmp_path / "lazy"))
    a, b = state_of(eager), state_of(lazy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_time(lazy_stats) == without_time(eager_stats)


@pytest.mark.parametrize("method", ["vq4dit", "codebook"])
def test_gptvq_init_starts_calibration_from_the_output_aware_fit(tmp_path, method):
    """codebook_init gptvq: the block walk measures each block's input moments and the method refits its layers
    before training, so every block's starting error (argmax assignment) is at most half the k-means start's
    (measured 3x-20x lower), and calibration still ends below its start. Catches the walk not passing the moments
    (k-means start again) or the moments taken from the wrong inputs."""
    def built(config, out_dir):  # as the job does: hard k-means layers, prepared when calibration reaches them
        teacher = tiny_dit(2)
        student = copy.deepcopy(teacher)
        qlayers = method_for(config.method, config.codebooks, config.seed).build(student, BLOCK_LINEARS, config.seed,
                                                                                 progress=False)
        return run_calibration(student, teacher, adapter_for(student), qlayers, config, str(out_dir))

    plain = built(tiny_config(method=method, iters=20, codebook_init="kmeans"), tmp_path / "plain")
    fit = built(tiny_config(method=method, iters=20, codebook_init="gptvq"), tmp_path / "gptvq")
    for p, f in zip(plain, fit):
        assert f["mse_before"] <= 0.5 * p["mse_before"]
    assert sum(s["mse_after"] for s in fit) < sum(s["mse_before"] for s in fit)


def test_calibration_never_leaves_a_block_worse_than_its_start(tmp_path, caplog):
    """A learning rate 10^5 times the default wrecks the codebooks: the guard (calib/guard.py) sends layers back to
    their starting point, so every block ends at most at its starting error (the tiny set has fewer points than
    the probe: the comparison is exact), with a warning that gives the numbers. Catches the guard skipped or keeping
    the worse state."""
    config = tiny_config(iters=20, lr_codebook=10.0)
    with caplog.at_level(logging.WARNING, logger="vq4dit.calib.guard"):
        _, _, _, stats = run(config, tmp_path)
    assert any(s["reverted"] for s in stats)
    assert all(s["mse_after"] <= s["mse_before"] * 1.01 for s in stats)  # 1%: the start's codebook rounded to fp16
    assert "calibration left the block worse than its start" in caplog.text


def test_under_torchrun_the_guards_warning_is_said_once_with_every_processs_points(caplog, monkeypatch):
    """A new user's trial: under torchrun each rank logged the guard's warning, with its own share of the points (8
    where the errors were over 16). Two processes simulated: rank 0 says it once with the summed count, rank 1 says
    nothing (mutations: the local count; every rank warning)."""
    import vq4dit.calib.guard as guard

    monkeypatch.setattr(guard.distributed, "all_sum_", lambda t: t.mul_(2))  # two equal shares
    for rank in (0, 1):
        monkeypatch.setattr(guard.distributed, "rank", lambda rank=rank: rank)
        with caplog.at_level(logging.WARNING, logger="vq4dit.calib.guard"):
            guard.warn_reverted((2.0, 1.0, 0.9), 8, ["blocks.0.fc1"], 4)
    assert [m.split(": 1 of 4")[0] for m in caplog.messages] == [
        "calibration left the block worse than its start (error 2 vs 1 on 16 points)"]


def test_the_block_log_says_when_each_layer_hardened_in_words(caplog):
    """A short run (--iters 20) logged `hard at iteration None` for every layer (mutation: the raw value logged)."""
    import logging

    from vq4dit.calib.blockwise import log_block

    layer = {"selected": 0.0, "weight_mse_before": 1.0, "weight_mse_after": 0.5}
    stats = {"block": 0, "name": "blocks.0", "mse_before": 1.0, "mse_after": 0.5, "seconds": 1.0,
             "layers": {"a": {**layer, "hardened_at": None}, "b": {**layer, "hardened_at": 0},
                        "c": {**layer, "hardened_at": 30}}}
    with caplog.at_level(logging.INFO, logger="vq4dit.calib.blockwise"):
        log_block(stats)
    lines = caplog.messages[1:]
    assert ["hard at the end, at its argmax" in lines[0], "hard from the start" in lines[1],
            "hard at update 30" in lines[2]] == [True] * 3
    assert "None" not in caplog.text
