"""evaluate.py end to end: JSON keys and values, table, kind selection and one-line errors (exit 2)."""
import argparse
import errno
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.cli_helpers import cli_error as cli_errors
from vq4dit.cli import evaluate
from vq4dit.evaluation.classifier import DigitsClassifier, save_classifier
from vq4dit.evaluation.digits import real_digits_uint8
from vq4dit.evaluation.metrics import paired_mse
from vq4dit.utils.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(samples, **kwargs):
    defaults = dict(reference=None, json=None, kind=None, ref_batch=None, classifier="unused.safetensors")
    return argparse.Namespace(samples=samples, **{**defaults, **kwargs})


@pytest.fixture
def digits_batches(tmp_path):
    """A 'quantized' batch (real digits, lightly perturbed) and its 'FP reference' (the real digits)."""
    images, labels = real_digits_uint8()
    fp = images[:200]
    noise = np.random.default_rng(0).integers(-3, 4, size=fp.shape)
    q = np.clip(fp.astype(int) + noise, 0, 255).astype(np.uint8)
    paths = {}
    for name, arr in [("q", q), ("fp", fp)]:
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], arr_0=arr, arr_1=labels[:200])
    return paths, q, fp


@pytest.fixture
def classifier(tmp_path):
    """Path of a narrow, untrained (seeded) digits classifier."""
    torch.manual_seed(0)
    path = str(tmp_path / "classifier.safetensors")
    save_classifier(DigitsClassifier(width=4, feature_dim=8), path)
    return path


def test_digits_json_and_table(tmp_path, digits_batches, classifier, capsys):
    paths, q, fp = digits_batches
    out = tmp_path / "out" / "eval.json"
    evaluate.main(args(paths["q"], reference=paths["fp"], json=str(out), classifier=classifier))
    result = json.loads(out.read_text())
    assert list(result) == ["fid", "accuracy", "psnr_vs_reference", "mse_vs_reference", "num_samples", "notes"]
    assert result["num_samples"] == 200
    assert result["mse_vs_reference"] == pytest.approx(paired_mse(q, fp))
    assert result["psnr_vs_reference"] == pytest.approx(-10 * math.log10(result["mse_vs_reference"]))
    assert 0 <= result["accuracy"] <= 1 and result["fid"] > 0
    table = capsys.readouterr().out
    assert "psnr_vs_reference" in table and f"{result['fid']:.6g}" in table


def test_without_reference_paired_metrics_are_null(tmp_path, digits_batches, classifier):
    paths, _, _ = digits_batches
    out = tmp_path / "eval.json"
    evaluate.main(args(paths["q"], json=str(out), kind="digits", classifier=classifier))
    result = json.loads(out.read_text())
    assert result["psnr_vs_reference"] is None and result["mse_vs_reference"] is None
    assert result["fid"] is not None


def test_identical_reference_gives_infinite_psnr(tmp_path, digits_batches, classifier):
    paths, _, _ = digits_batches
    out = tmp_path / "eval.json"
    evaluate.main(args(paths["fp"], reference=paths["fp"], json=str(out), classifier=classifier))
    text = out.read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert result["mse_vs_reference"] == 0 and result["psnr_vs_reference"] is None
    assert result["notes"] == {"psnr_vs_reference": "infinite: the samples are identical to the reference (mse 0)"}


def test_a_non_finite_metric_is_an_error_never_invalid_json(tmp_path, digits_batches, classifier, capsys,
                                                             monkeypatch):
    """`--json` held Infinity (issue 29): a metric that is not finite (here a FID of NaN) is one line, no file
    (mutation: no check_finite_metrics -> json.dumps(allow_nan=False) raises a ValueError traceback)."""
    import vq4dit.evaluation.report

    paths, _, _ = digits_batches
    monkeypatch.setattr(vq4dit.evaluation.report, "digits_metrics", lambda *a: {"fid": math.nan, "accuracy": 0.5})
    out = tmp_path / "out" / "eval.json"
    line = cli_error(capsys, ["--samples", paths["q"], "--json", str(out), "--classifier", classifier])
    assert line == f"error: {paths['q']}: fid came out nan; the samples or the reference are degenerate (e.g. all " \
                   "images equal), no finite value to report"
    assert not out.exists()


def test_text_to_image_samples_are_not_scored_as_digits(tmp_path, digits_batches, classifier, capsys):
    """sample.py records what arr_1 holds; prompt indices of 16x16 text-to-image samples were scored by the digits
    classifier as if they were classes (mutation: label_kind not consulted)."""
    from vq4dit.utils.imagefiles import save_samples

    _, q, _ = digits_batches
    save_samples(tmp_path / "t2i", q[:6], np.arange(6) % 3, prompted=True)
    samples = str(tmp_path / "t2i" / "samples.npz")
    line = cli_error(capsys, ["--samples", samples, "--kind", "digits", "--classifier", classifier])
    assert line.startswith(f"error: {samples}: text-to-image samples (arr_1 holds prompt indices") and \
        "give --reference FP.npz (paired PSNR/MSE" in line
    line = cli_error(capsys, ["--samples", samples])  # auto: not digits; with nothing to compare against
    assert line.startswith("error: --ref-batch or --reference: required for --kind imagenet and text-to-image")
    save_samples(tmp_path / "classes", q[:6], np.arange(6) % 3)
    evaluate.main(args(str(tmp_path / "classes" / "samples.npz"), classifier=classifier))  # class samples: scored


def test_text_to_image_samples_get_a_paired_psnr_without_fid_or_a_reference_batch(tmp_path, digits_batches, capsys):
    """Quantized text-to-image samples against full-precision ones: a PSNR needed --kind imagenet --ref-batch and
    torch-fidelity (mutations: the reference batch still required; FID computed without one -> torch-fidelity's
    error, or a crash on a missing file)."""
    from vq4dit.evaluation.metrics import paired_mse
    from vq4dit.evaluation.report import evaluate_files
    from vq4dit.utils.imagefiles import save_samples

    _, q, fp = digits_batches
    save_samples(tmp_path / "q", q[:6], np.arange(6) % 3, prompted=True)
    save_samples(tmp_path / "fp", fp[:6], np.arange(6) % 3, prompted=True)
    result = evaluate_files(str(tmp_path / "q" / "samples.npz"), str(tmp_path / "fp" / "samples.npz"))
    assert result["fid"] is None and result["mse_vs_reference"] == paired_mse(q[:6], fp[:6])
    assert result["psnr_vs_reference"] > 0 and result["num_samples"] == 6


def exits_with_error(capsys, match, namespace):
    with pytest.raises(SystemExit) as info:
        run_cli(evaluate.main, namespace)  # what evaluate.py's __main__ does
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and match in err


def write_videos(directory, frames=16, height=16, seed=0, sampling=None):
    """sample.py's samples.npz of 4 videos (N, F, H, W, 3) of 2 prompts, (the videos, its path)."""
    from vq4dit.utils.imagefiles import save_samples

    videos = np.random.default_rng(seed).integers(0, 256, (4, frames, height, 8, 3), dtype=np.uint8)
    save_samples(directory, videos, np.arange(4) % 2, prompted=True, sampling=sampling)
    return videos, str(directory / "samples.npz")


def test_videos_get_a_paired_psnr_over_every_frame(tmp_path, capsys):
    """sample.py's videos against full-precision ones: the paired PSNR/MSE of every frame, as JSON and table
    (mutation: videos read as images -> refused for their shape, or, 16 frames of 16 rows, scored as 16x16 digits)."""
    q, q_path = write_videos(tmp_path / "q")
    fp, fp_path = write_videos(tmp_path / "fp", seed=1)
    out = tmp_path / "eval.json"
    evaluate.main(args(q_path, reference=fp_path, json=str(out), classifier=None))
    result = json.loads(out.read_text())
    diff = (q.astype(np.float64) - fp) / 255
    assert result["mse_vs_reference"] == pytest.approx(float(np.mean(diff * diff)), rel=1e-12)
    assert result["num_samples"] == 4 and result["fid"] is None and result["accuracy"] is None
    assert "psnr_vs_reference" in capsys.readouterr().out


@pytest.mark.parametrize("flags, match", [
    ({}, "--reference: required for"),
    ({"kind": "digits"}, "--kind: "),
    ({"ref_batch": "real.npz"}, "--ref-batch: "),
    ({"reference": "frames"}, "have shape (4, 5, 16, 8, 3); must match the samples' (4, 16, 16, 8, 3)"),
    ({"reference": "settings"}, "the reference was sampled with seed 1 (the samples: 0)"),
])
def test_videos_without_a_reference_or_with_an_image_benchmark_are_refused(tmp_path, capsys, flags, match):
    _, q_path = write_videos(tmp_path / "q", sampling={"seed": 0})
    other = {"frames": write_videos(tmp_path / "frames", frames=5, sampling={"seed": 0})[1],
             "settings": write_videos(tmp_path / "settings", sampling={"seed": 1})[1]}
    flags = {k: other.get(v, v) for k, v in flags.items()}
    exits_with_error(capsys, match, args(q_path, **flags))


def test_user_errors(tmp_path, digits_batches, capsys):
    paths, _, fp = digits_batches
    exits_with_error(capsys, "no such file", args(str(tmp_path / "missing.npz")))
    exits_with_error(capsys, "only used with --kind imagenet", args(paths["q"], ref_batch=paths["fp"]))
    exits_with_error(capsys, "--classifier unused.safetensors: no such file", args(paths["q"]))
    np.savez(tmp_path / "short.npz", arr_0=fp[:10], arr_1=np.zeros(10, int))
    exits_with_error(capsys, "must match the samples'", args(paths["q"], reference=str(tmp_path / "short.npz")))
    big = np.zeros((3, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=big)
    exits_with_error(capsys, "--kind digits: samples are 32x32", args(str(tmp_path / "big.npz"), kind="digits"))
    exits_with_error(capsys, "--ref-batch or --reference: required", args(str(tmp_path / "big.npz")))
    np.savez(tmp_path / "labels.npz", arr_0=fp[:3], arr_1=np.array([0, 1, 10]))
    exits_with_error(capsys, "must be in [0, 10)", args(str(tmp_path / "labels.npz")))


def test_imagenet_needs_torch_fidelity(tmp_path, capsys):
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity is installed")
    except ImportError:
        pass
    big = np.zeros((3, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "big.npz", arr_0=big, arr_1=np.array([0, 999, 5]))
    exits_with_error(capsys, "pip install torch-fidelity",
                     args(str(tmp_path / "big.npz"), ref_batch=str(tmp_path / "big.npz")))


def test_a_video_reference_batch_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """--ref-batch of videos with image samples ended in a traceback inside the FID's dataset (mutation: no check)."""
    import vq4dit.evaluation.report as report

    monkeypatch.setattr(report, "import_torch_fidelity", lambda: None)
    monkeypatch.setattr(report, "inception_fid", lambda *a: pytest.fail("computed an FID"))
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((3, 32, 32, 3), np.uint8), arr_1=np.array([0, 999, 5]))
    _, videos = write_videos(tmp_path / "v")
    exits_with_error(capsys, f"--ref-batch {videos}: holds videos (4, 16, 16, 8, 3); an ADM reference batch holds",
                     args(str(tmp_path / "images.npz"), ref_batch=videos, kind="imagenet"))


def test_cli_exit_status_without_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "evaluate.py", "--samples", str(tmp_path / "missing.npz")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("no such file; expected an .npz with arr_0 uint8 (N, H, W, 3)")


def cli_error(capsys, argv):
    return cli_errors(evaluate.cli, argv, capsys)


def test_json_to_a_directory_or_under_a_file_fails_before_the_metrics(tmp_path, digits_batches, capsys, monkeypatch):
    paths, _, _ = digits_batches
    monkeypatch.setattr(evaluate, "evaluate_files", lambda *a, **k: pytest.fail("computed the metrics first"))
    line = cli_error(capsys, ["--samples", paths["q"], "--json", str(tmp_path)])
    assert f"--json {tmp_path}: is a directory" in line
    line = cli_error(capsys, ["--samples", paths["q"], "--json", str(tmp_path / "q.npz" / "eval.json")])
    assert "--json" in line and "not a writable directory" in line
    assert sorted(os.listdir(tmp_path)) == ["fp.npz", "q.npz"]


def test_json_over_a_file_that_is_not_a_result_is_refused_and_a_result_is_replaced(tmp_path, digits_batches,
                                                                                   classifier, capsys, monkeypatch):
    """--json naming the samples themselves (or an artifact's config.yaml) destroyed them; now only an earlier
    evaluate.py result may be replaced. Catches the check left out (the .npz replaced by JSON) or any existing file
    refused (a rerun into the same eval.json refused)."""
    paths, _, _ = digits_batches
    before = open(paths["q"], "rb").read()
    line = cli_error(capsys, ["--samples", paths["q"], "--json", paths["q"]])
    assert f"--json {paths['q']}: exists and is not an evaluate.py result" in line
    assert open(paths["q"], "rb").read() == before
    out = tmp_path / "eval.json"
    for _ in range(2):  # the second run replaces the first's result
        evaluate.main(args(paths["q"], json=str(out), classifier=classifier))
    assert json.loads(out.read_text())["num_samples"] == 200


def test_samples_given_sample_pys_directory_read_its_samples_npz(tmp_path, digits_batches, classifier, capsys):
    """--samples DIR (sample.py's --out) reads DIR/samples.npz; a directory without one is one line saying so, not
    "no such file" (mutation: the directory passed on as a file)."""
    paths, _, _ = digits_batches
    (tmp_path / "run").mkdir()
    os.replace(paths["q"], tmp_path / "run" / "samples.npz")
    out = tmp_path / "eval.json"
    evaluate.main(args(str(tmp_path / "run"), json=str(out), classifier=classifier))
    assert json.loads(out.read_text())["num_samples"] == 200
    (tmp_path / "empty").mkdir()
    line = cli_error(capsys, ["--samples", str(tmp_path / "empty")])
    assert f"--samples {tmp_path / 'empty'}: is a directory without samples.npz" in line


def test_path_flags_expand_the_home_directory(tmp_path, digits_batches, classifier, monkeypatch):
    """--json=~/eval.json (the shell leaves ~ after = alone): the file lands in $HOME, not in a directory named ~
    (mutation: the flag without local_path)."""
    paths, _, _ = digits_batches
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    parsed = evaluate.build_parser().parse_args(["--samples=~/../q.npz", "--json=~/eval.json", "--classifier",
                                                 classifier])
    evaluate.main(parsed)
    assert (tmp_path / "home" / "eval.json").is_file() and not (tmp_path / "~").exists()


def test_samples_given_a_npy(tmp_path, digits_batches, capsys):
    _, q, _ = digits_batches
    np.save(tmp_path / "q.npy", q)
    line = cli_error(capsys, ["--samples", str(tmp_path / "q.npy")])
    assert str(tmp_path / "q.npy") in line and "not a zip archive" in line


def test_a_full_disk_writing_the_json_is_one_line_and_leaves_nothing(tmp_path, digits_batches, classifier, capsys,
                                                                     monkeypatch):
    paths, _, _ = digits_batches
    real_open = open

    def full_on_write(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".tmp"):
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr("builtins.open", full_on_write)
    out = tmp_path / "out" / "eval.json"
    line = cli_error(capsys, ["--samples", paths["q"], "--json", str(out), "--classifier", classifier])
    assert f"{out}: no space left on the device (needed " in line
    assert os.listdir(out.parent) == []  # no eval.json, no temporary file


def test_a_reference_sampled_with_other_settings_is_refused(tmp_path, digits_batches, classifier, capsys):
    """Samples and reference drawn with another seed (or steps, guidance) share labels and shapes, and gave a
    plausible, meaningless PSNR; sample.py now records its settings and a paired comparison checks them. Files
    without the record (another tool's) are compared as before (mutations: the check left out; settings not
    written)."""
    from vq4dit.utils.imagefiles import save_samples

    _, q, fp = digits_batches
    labels = real_digits_uint8()[1][:200]
    for name, images, seed in (("fp", fp, 0), ("q", q, 0), ("other", q, 1)):
        (tmp_path / name).mkdir()
        save_samples(str(tmp_path / name), images, labels, sampling={"seed": seed, "steps": 4, "cfg_scale": 1.5})
    out = tmp_path / "eval.json"
    evaluate.main(args(str(tmp_path / "q" / "samples.npz"), reference=str(tmp_path / "fp" / "samples.npz"),
                       json=str(out), classifier=classifier))
    assert json.loads(out.read_text())["psnr_vs_reference"] > 30
    line = cli_error(capsys, ["--samples", str(tmp_path / "other"), "--reference", str(tmp_path / "fp"),
                              "--classifier", classifier])
    assert "the reference was sampled with seed 0 (the samples: 1)" in line


def test_an_fid_from_fewer_samples_than_feature_dimensions_warns(tmp_path, classifier, caplog):
    """FID at 2-6 samples printed a number (2492.9) with no word that it is mostly bias: now a warning when the
    samples are no more than the features' dimensions (8 for this classifier), none above (mutation: no warning)."""
    import logging

    images, labels = real_digits_uint8()
    for n, warned in ((6, True), (40, False)):
        np.savez(tmp_path / f"s{n}.npz", arr_0=images[:n], arr_1=labels[:n])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vq4dit.evaluation.digits"):
            evaluate.main(args(str(tmp_path / f"s{n}.npz"), classifier=classifier))
        assert any("no more than the 8 feature dimensions" in r.getMessage() for r in caplog.records) == warned
