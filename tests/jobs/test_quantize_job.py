import json
import os

import pytest
import torch
import yaml

from tests.cli_helpers import read_by
from tests.conftest import randomize
from vq4dit.calib.checkpoints import STATE_DIR, Checkpoint, CheckpointStore
from vq4dit.jobs.config import load_config
from vq4dit.jobs.quantize import quantize
from vq4dit.jobs.runkey import RunKey
from vq4dit.models.loading import save_dit
from vq4dit.utils.errors import UserError
from vq4dit.vq import load_quantized


@pytest.fixture
def tiny_ckpt(tmp_path):
    from vq4dit.models.loading import DiTSpec

    model = randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build())
    path = tmp_path / "tiny.safetensors"
    save_dit(model, "DiT-Digits/2", path)
    return str(path)


@pytest.mark.parametrize("method", ["vq4dit", "kmeans", "codebook", "rtn"])
def test_every_method_writes_a_loadable_artifact_and_drops_the_state(tiny_ckpt, tmp_path, method):
    budget = {"codebook_size": 16, "kmeans_iters": 3, "iters": 2, "calib_samples": 2, "calib_timesteps": 2, "steps": 3}
    config = load_config(overrides={"ckpt": tiny_ckpt, "method": method, **read_by(method, budget)})
    out = tmp_path / method
    quantize(config, str(out), progress=False)
    assert not os.path.exists(out / STATE_DIR)
    model, ref, quant = load_quantized(out)
    assert ref["class"] == "vq4dit.models.dit.DiT" and ref["name"] == "DiT-Digits/2"
    assert ref["config"]["input_size"] == 8
    assert len(quant["layers"]) == 6 * 5
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    assert torch.isfinite(model(x, t, y)).all()


def store_of(out, config):
    return CheckpointStore(out, RunKey.of(config))


def saved_by(out, config):
    """A first checkpoint of a run of `config` in `out`, as its record stage saves it."""
    store_of(out, config).save(Checkpoint(acts={}, wiring={}))


def test_state_of_another_config_fails_before_any_model_work(tiny_ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "out")  # not tmp_path, which holds the checkpoint: a file vq4dit did not write
    saved_by(out, load_config(overrides={"ckpt": tiny_ckpt, "iters": 3}))
    config = load_config(overrides={"ckpt": tiny_ckpt, "iters": 2})
    monkeypatch.setattr("vq4dit.jobs.quantize.load_model", None)  # loading the checkpoint (or k-means) would fail
    with pytest.raises(UserError, match="config changed .*iters 3 -> 2.*new --out"):
        quantize(config, out, progress=False)


def test_a_checkpoint_replaced_at_the_same_path_is_not_resumed(tiny_ckpt, tmp_path, monkeypatch):
    """After a kill, the file at --ckpt is another model: resuming would mix the two (issue 20). A copy of the same
    file (new mtime) still resumes."""
    from vq4dit.models.loading import DiTSpec

    config = load_config(overrides={"ckpt": tiny_ckpt, "iters": 2})
    out = str(tmp_path / "out")
    saved_by(out, config)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(open(tiny_ckpt, "rb").read())
    os.replace(copy, tiny_ckpt)
    assert store_of(out, config).meta is not None  # same content: resumes
    other = randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build(), seed=1)
    save_dit(other, "DiT-Digits/2", tiny_ckpt)
    monkeypatch.setattr("vq4dit.jobs.quantize.load_model", None)  # refused before the model loads
    with pytest.raises(UserError, match=f"checkpoint {tiny_ckpt} changed since the saved calibration state "
                                        r"\(digest \w+ != \w+\); rerun with a new --out"):
        quantize(config, out, progress=False)


def test_a_method_without_calibration_keeps_another_runs_state_unless_told(tiny_ckpt, tmp_path):
    """quantize --method rtn over a run's directory: refused with its state intact; --overwrite deletes it."""
    out = str(tmp_path / "out")
    saved_by(out, load_config(overrides={"ckpt": tiny_ckpt}))
    rtn = load_config(overrides={"ckpt": tiny_ckpt, "method": "rtn"})
    with pytest.raises(UserError, match=r"calib_state: the resumable state of another run \(--method rtn does not "
                                        "calibrate\\); .*pass --overwrite"):
        quantize(rtn, out, progress=False)
    assert os.path.exists(os.path.join(out, STATE_DIR, "state.json"))
    quantize(rtn, out, progress=False, overwrite=True)
    assert not os.path.exists(os.path.join(out, STATE_DIR)) and load_quantized(out)[2]["layers"]


def test_the_authors_recipe_writes_an_artifact_that_records_it(tiny_ckpt, tmp_path):
    config = load_config(overrides={"ckpt": tiny_ckpt, "recipe": "authors", "codebook_size": 16, "kmeans_iters": 3,
                                    "calib_samples": 2, "online_batch": 2, "steps": 3})
    out = tmp_path / "out"
    quantize(config, str(out), progress=False)
    model, _, quant = load_quantized(out)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["recipe"], recorded["calib"], recorded["cfg_scale"], recorded["kmeans_init"]) == (
        "authors", "online", 4.0, "authors")
    log = [json.loads(line) for line in (out / "calib_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(r["mode"] == "online" and r["updates"] == 2 * 3 for r in log)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    assert torch.isfinite(model(x, t, y)).all() and len(quant["layers"]) == 6 * 5


def test_an_artifact_whose_config_yaml_is_missing_or_another_is_refused(tiny_ckpt, tmp_path):
    """config.yaml is covered by quant_config.json's digest (mutation: the check skipped, or only a missing file
    caught); the artifact loads again once its own file is back."""
    first, second = tmp_path / "a", tmp_path / "b"
    for out, seed in ((first, 0), (second, 1)):
        quantize(load_config(overrides={"ckpt": tiny_ckpt, "method": "rtn", "seed": seed}), str(out), progress=False)
    own = (first / "config.yaml").read_bytes()
    (first / "config.yaml").unlink()
    with pytest.raises(UserError, match=r"a/config.yaml: missing; quant_config.json records"):
        load_quantized(first)
    (first / "config.yaml").write_bytes((second / "config.yaml").read_bytes())
    with pytest.raises(UserError, match=r"a/config.yaml: not this artifact's config"):
        load_quantized(first)
    (first / "config.yaml").write_bytes(own)
    assert load_quantized(first)[2]["config_sha256"]


def test_a_calibration_set_that_cannot_fit_is_refused_before_k_means(tiny_ckpt, tmp_path, monkeypatch):
    """10^12 trajectories met the allocator with a traceback (issue 20); now an estimate refuses them in one line
    naming the flag, before any k-means (mutation: the check skipped, or made after the method builds the layers)."""
    monkeypatch.setattr("vq4dit.jobs.quantize.method_for",
                        lambda *a: type("M", (), {"calibrated": True, "build": None})())
    config = load_config(overrides={"ckpt": tiny_ckpt, "calib_samples": 10**12})
    with pytest.raises(UserError, match=r"--calib-samples 1000000000000: .* rows need at least .* GiB, more than this "
                                        "machine's memory and the free disk under"):
        quantize(config, str(tmp_path / "out"), progress=False)
    online = config.replace(calib="online", calib_samples=1, online_batch=10**12)
    with pytest.raises(UserError, match=r"--online-batch 1000000000000: .* more than the memory of cpu"):
        quantize(online, str(tmp_path / "out"), progress=False)


def test_a_cache_dir_that_is_a_file_is_refused_before_loading(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("vq4dit.jobs.quantize.load_model", None)
    config = load_config(overrides={"ckpt": tiny_ckpt, "cache_dir": tiny_ckpt})
    with pytest.raises(UserError, match="--cache-dir .*tiny.safetensors: exists and is not a directory"):
        quantize(config, str(tmp_path / "out"), progress=False)


def test_an_interrupted_rerun_keeps_the_artifacts_log_until_it_has_its_own(tiny_ckpt, tmp_path, monkeypatch):
    """A calibrating rerun into an artifact's directory cleared the artifact's calib_log.jsonl when it started, so a
    Ctrl-C left the old artifact with a log of one block of another run. Now the old log stays until the new
    artifact is written, and the resumed run's log has every block once (mutation: the log written beside the
    artifact while it grows -> after the interrupt the old log is gone)."""
    from vq4dit.calib.checkpoints import LOG_NAME, CalibLog

    # the k-means start: the output-aware fit (4 s a run here) has nothing to do with the log
    budget = {"codebook_size": 16, "kmeans_iters": 2, "iters": 2, "calib_samples": 2, "calib_timesteps": 2,
              "steps": 3, "codebook_init": "kmeans", "ckpt": tiny_ckpt}
    out = tmp_path / "w"
    quantize(load_config(overrides=budget), str(out), progress=False)
    before = (out / LOG_NAME).read_text()
    rerun = load_config(overrides={**budget, "seed": 1})
    append = CalibLog.append

    def interrupted(self, mode, records):
        append(self, mode, records)
        raise KeyboardInterrupt

    monkeypatch.setattr(CalibLog, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(rerun, str(out), progress=False)
    assert (out / LOG_NAME).read_text() == before
    monkeypatch.setattr(CalibLog, "append", append)
    quantize(rerun, str(out), progress=False)
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert [r["block"] for r in log] == list(range(6)) and (out / LOG_NAME).read_text() != before
