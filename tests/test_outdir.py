"""Output directories (issue 29): files vq4dit did not write are refused unless --overwrite and never replaced, and
one run at a time writes a directory (utils/outdir.py, wired into quantize.py and QuantizedTransformer.save). The real
scripts run in subprocesses where a case holds a lock against them or follows the README; the other cases call their
cli(argv) here (tests.cli_helpers.run_here)."""
import fcntl
import json
import os
import subprocess
import sys

import pytest

from tests.cli_helpers import assert_user_error, run, run_here, save_tiny_ckpt
from tests.conftest import randomize
from vq4dit import QuantizedTransformer
from vq4dit.jobs.config import load_config
from vq4dit.models.loading import DiTSpec
from vq4dit.utils.errors import UserError
from vq4dit.utils.outdir import MARKER, claim_out_dir
from vq4dit.vq import load_quantized
from vq4dit.vq.apply import quantize_linears
from vq4dit.vq.artifact import ARTIFACT_FILES
from vq4dit.vq.layer import CodebookSpec

NAMES = ("model.safetensors", "README.md")
RTN = ("--method", "rtn", "--device", "cpu")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_tiny_ckpt(path)
    return path


def hold_lock(out):
    """A process holding the lock of `out` (as a run writing it would), once it has printed "held"."""
    code = (f"import fcntl, json, os, sys, time; fd = os.open({str(out / MARKER)!r}, os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid()}).encode()); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ---- utils/outdir.py ----------------------------------------------------------------------------------------------
def test_a_foreign_file_of_an_output_name_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "README.md").write_text("the project's")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=f"{tmp_path}: holds README.md, not written by vq4dit"):
            with claim_out_dir(tmp_path, NAMES, overwrite):
                pytest.fail("claimed")
    assert os.listdir(tmp_path) == ["README.md"]  # no marker left behind


def test_a_killed_writes_temporary_is_the_tools_own(tmp_path):
    """A marked directory holding the temporary a killed write of one of its files left (utils.fileio.temporary_name)
    is claimed without --overwrite; a look-alike of another name is still foreign. Catches temporaries taken as
    foreign (a rerun after a kill refused)."""
    with claim_out_dir(tmp_path, NAMES):
        pass
    (tmp_path / ".README.md.0123abcd.tmp").write_text("half a file")
    with claim_out_dir(tmp_path, NAMES):
        pass
    (tmp_path / ".notes.txt.0123abcd.tmp").write_text("not ours")
    with pytest.raises(UserError, match=r"did not write \(.notes.txt.0123abcd.tmp\)"):
        with claim_out_dir(tmp_path, NAMES):
            pass


def test_other_foreign_files_need_overwrite_and_are_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files vq4dit did not write \(notes.txt\).*--overwrite"):
        with claim_out_dir(tmp_path, NAMES):
            pass
    with claim_out_dir(tmp_path, NAMES, overwrite=True):
        (tmp_path / "README.md").write_text("ours")
    with claim_out_dir(tmp_path, ("README.md",), overwrite=True):  # marked: our README.md is ours to replace
        (tmp_path / "README.md").write_text("ours again")
    assert sorted(os.listdir(tmp_path)) == [MARKER, "README.md", "notes.txt"]


def test_the_lock_refuses_a_second_claim_and_dies_with_its_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(UserError, match=f"{tmp_path}: another run \\(pid {holder.pid}\\) is writing to it"):
            with claim_out_dir(tmp_path, NAMES):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claim_out_dir(tmp_path, NAMES):  # the killed holder's lock is gone with it
        assert json.loads((tmp_path / MARKER).read_text())["pid"] == os.getpid()


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with claim_out_dir(tmp_path, NAMES):
            (tmp_path / sorted(NAMES)[0]).write_text("written before the interrupt")
            raise KeyboardInterrupt
    fd = os.open(tmp_path / MARKER, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while a claim still holds it
    finally:
        os.close(fd)


@pytest.mark.parametrize("error", [KeyboardInterrupt, UserError])
def test_a_run_that_failed_before_writing_leaves_nothing(tmp_path, error):
    """Ctrl-C or an error after the claim and before any output: neither the marker nor the directories the claim
    created stay (mutation: keep the marker of a claim that wrote nothing -> an empty directory with .vq4dit left)."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "foreign.txt").write_text("not ours")
    for out in (tmp_path / "new" / "deeper", tmp_path / "kept"):
        with pytest.raises(error):
            with claim_out_dir(out, NAMES, overwrite=True):
                raise error("failed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["foreign.txt", "kept"]


def test_a_nested_vq4dit_output_is_kept_and_refuses_nothing(tmp_path):
    """sample.py's output inside an artifact (the README's DIR/samples): a subdirectory with its own marker is
    vq4dit's, so rerunning the quantize into DIR is not refused, and it is kept; a plain subdirectory is still
    foreign. Catches the nested marker ignored (a rerun of the README's steps refused)."""
    with claim_out_dir(tmp_path, NAMES, tool="a quantized artifact"):
        (tmp_path / "README.md").write_text("ours")
    with claim_out_dir(tmp_path / "samples", ("samples.npz",), tool="samples"):
        (tmp_path / "samples" / "samples.npz").write_text("samples")
    with claim_out_dir(tmp_path, NAMES, tool="a quantized artifact"):
        (tmp_path / "README.md").write_text("ours again")
    assert (tmp_path / "samples" / "samples.npz").read_text() == "samples"
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"did not write \(plain\)"):
        with claim_out_dir(tmp_path, NAMES, tool="a quantized artifact"):
            pass


def test_another_tools_directory_is_named_for_what_it_holds(tmp_path):
    """sample.py given an artifact's directory says it holds an artifact (not "files vq4dit did not write", which
    was false); --overwrite still writes beside it and keeps it. Catches the marker's tool not written or not read."""
    with claim_out_dir(tmp_path, NAMES, tool="a quantized artifact"):
        (tmp_path / "README.md").write_text("ours")
    with pytest.raises(UserError, match=rf"{tmp_path}: holds a quantized artifact \(README.md\), not samples; give "
                                        "another directory"):
        with claim_out_dir(tmp_path, ("samples.npz",), tool="samples"):
            pass
    with claim_out_dir(tmp_path, ("samples.npz",), overwrite=True, tool="samples"):
        (tmp_path / "samples.npz").write_text("samples")
    assert sorted(os.listdir(tmp_path)) == [MARKER, "README.md", "samples.npz"]


def test_rerunning_the_readmes_steps_into_one_directory_works(ckpt, tmp_path):
    """quantize.py --out DIR, sample.py --out DIR/samples, then quantize.py --out DIR again (run.sh's layout): the
    second quantize writes DIR and keeps DIR/samples; sample.py --out DIR is refused naming the artifact."""
    out = tmp_path / "w2"
    assert run("quantize.py", "--ckpt", ckpt, *RTN, "--out", out).returncode == 0
    sampled = run("sample.py", "--quantized", out, "--num-samples", 2, "--steps", 2, "--device", "cpu", "--out",
                  out / "samples")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    again = run("quantize.py", "--ckpt", ckpt, *RTN, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "samples" / "samples.npz").is_file()
    assert_user_error(run("sample.py", "--quantized", out, "--num-samples", 2, "--steps", 2, "--device", "cpu",
                          "--out", out), f"{out}: holds a quantized artifact")


# ---- quantize.py --------------------------------------------------------------------------------------------------
def test_quantize_refuses_a_foreign_readme_and_keeps_it(ckpt, tmp_path):
    (tmp_path / "README.md").write_bytes(b"# my project\n")
    result = run_here("quantize.py", "--ckpt", ckpt, *RTN, "--out", tmp_path, "--overwrite")
    assert_user_error(result, tmp_path, "README.md", "not written by vq4dit")
    assert sorted(os.listdir(tmp_path)) == ["README.md"] and (tmp_path / "README.md").read_bytes() == b"# my project\n"


def test_quantize_overwrite_writes_beside_a_foreign_file(ckpt, tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"keep me\n")
    assert_user_error(run_here("quantize.py", "--ckpt", ckpt, *RTN, "--out", tmp_path), tmp_path, "notes.txt",
                      "--overwrite")
    result = run_here("quantize.py", "--ckpt", ckpt, *RTN, "--out", tmp_path, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "notes.txt").read_bytes() == b"keep me\n" and load_quantized(tmp_path)[2]["layers"]


def test_quantize_refuses_an_out_another_run_is_writing(ckpt, tmp_path):
    fd = os.open(tmp_path / MARKER, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": os.getpid()}).encode())
        result = run("quantize.py", "--ckpt", ckpt, *RTN, "--out", tmp_path)
    finally:
        os.close(fd)
    assert_user_error(result, tmp_path, f"pid {os.getpid()}")
    assert os.listdir(tmp_path) == [MARKER]


# ---- vq4dit API ---------------------------------------------------------------------------------------------------
def test_api_save_refuses_foreign_files_and_keeps_them(tmp_path):
    spec = DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1)
    model = randomize(spec.build())
    for layer in quantize_linears(model, CodebookSpec(4, 4, kmeans_iters=2), progress=False).values():
        layer.harden()
    quantized = QuantizedTransformer(model, load_config(overrides={"method": "kmeans"}), {"name": spec.name})
    (tmp_path / "README.md").write_text("theirs")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="README.md, not written by vq4dit"):
        quantized.save(tmp_path, overwrite=True)
    os.remove(tmp_path / "README.md")
    with pytest.raises(UserError, match=r"\(notes.txt\).*overwrite=True"):
        quantized.save(tmp_path)
    quantized.save(tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted([MARKER, "notes.txt", *ARTIFACT_FILES])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_rerun_says_what_it_replaces_and_leaves_no_stale_calibration_log(ckpt, tmp_path):
    """A rerun into an artifact's directory with another method and seed replaced it without a word and left the
    calibrated run's calib_log.jsonl beside an uncalibrated artifact. Now the replacement is a warning naming the
    changed keys, method and seed first, and a method without calibration removes the log (mutations: no
    announcement; the log kept; the keys in alphabetical order -> calib_samples first)."""
    from tests.cli_helpers import FAST

    out = tmp_path / "w"
    assert run_here("quantize.py", "--ckpt", ckpt, *FAST, "--out", out).returncode == 0
    assert (out / "calib_log.jsonl").is_file()
    rtn = run_here("quantize.py", "--ckpt", ckpt, *RTN, "--seed", 3, "--out", out)
    assert rtn.returncode == 0, rtn.stderr[-2000:]
    warned = rtn.stderr.split("replacing the artifact there, made with another config (")[1].split("\n")[0]
    assert warned.startswith("method 'vq4dit' -> 'rtn'; ") and "seed 0 -> 3" in warned, warned  # these keys first
    assert not (out / "calib_log.jsonl").exists()


def test_sampling_over_earlier_samples_warns(tmp_path):
    """A second sample.py into one --out (a reference set given by mistake) replaced its samples.npz silently; now a
    warning says so, and the first run says nothing (mutation: the warning left out, or given always)."""
    argv = ("sample.py", "--num-samples", 2, "--steps", 2, "--device", "cpu", "--out", tmp_path / "s")
    first, second = run_here(*argv), run_here(*argv)
    assert first.returncode == second.returncode == 0, second.stderr[-2000:]
    assert "replacing the samples.npz" not in first.stderr
    assert f"{tmp_path / 's'}: replacing the samples.npz there" in second.stderr
    from vq4dit.evaluation.samples import sampling_of

    recorded = sampling_of(str(tmp_path / "s" / "samples.npz"))  # what evaluate.py's pairing check reads
    assert (recorded["seed"], recorded["steps"]) == (0, 2)


def test_sampling_an_artifact_another_run_is_writing_names_the_writer(tmp_path):
    """sample.py --quantized DIR while quantize.py writes DIR said "quant_config.json: missing ... (interrupted
    save?)"; it now names the run holding DIR's lock (mutation: the lock not looked at -> the old text)."""
    from vq4dit.vq.artifact import read_quant_config

    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(UserError, match=f"{tmp_path}: another run \\(pid {holder.pid}\\) is writing it"):
            read_quant_config(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(UserError, match="missing; .* not a complete quantized artifact"):
        read_quant_config(str(tmp_path))
    with claim_out_dir(tmp_path, NAMES):  # this process's own claim is no other run (mutation: pid not compared)
        with pytest.raises(UserError, match="missing; .* not a complete quantized artifact"):
            read_quant_config(str(tmp_path))


def test_an_artifacts_model_file_given_as_ckpt_says_what_it_is(ckpt, tmp_path):
    """--ckpt ARTIFACT/model.safetensors said "does not match model DiT-Digits/2 ...; the weights look like
    DiT-Digits/2" (self-contradictory); it now says it is a quantized artifact and how to sample it (mutation: the
    format not looked at -> the old text)."""
    out = tmp_path / "w"
    assert run_here("quantize.py", "--ckpt", ckpt, *RTN, "--out", out).returncode == 0
    assert_user_error(run_here("sample.py", "--ckpt", out / "model.safetensors", "--num-samples", 2, "--steps", 2,
                               "--device", "cpu", "--out", tmp_path / "s"),
                      "the packed tensors of a quantized vq4dit artifact", f"sample.py --quantized {out}")
