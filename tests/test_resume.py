"""Issue 6 items 2-4: interrupted quantize.py runs leave nothing that looks finished, and the same command
resumes them to the very artifact an uninterrupted run writes; the same command and seed twice give the same bytes
(two runs at 2 threads against each other; at 1 thread, every interrupted and resumed pair of runs against the
uninterrupted reference).

Every run is the real entry script in a subprocess on the tiny depth-6 model (8x8 inputs), calibrating all blocks.
"""
import hashlib
import json
import signal
import time

import pytest

from tests.cli_helpers import FAST, leftovers, popen, run, save_tiny_ckpt
from vq4dit.vq.artifact import MODEL_FILE, QUANT_FILE


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quantize_args(ckpt, out, iters=12):
    # 12 iterations per block (FAST has 4): the five blocks after block 0's save then take about 5 s, long enough
    # for the signal to land mid-calibration (at 4 a tiny run could finish within the poller's 10 ms); 30 took 7 s
    # more per run
    return ("--ckpt", ckpt, *FAST, "--iters", str(iters), "--seed", "3", "--out", out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(checkpoint, sha256 of model.safetensors, of quant_config.json) of one uninterrupted run."""
    root = tmp_path_factory.mktemp("resume")
    ckpt = root / "tiny.safetensors"
    save_tiny_ckpt(ckpt)
    result = run("quantize.py", *quantize_args(ckpt, root / "ref"))
    assert result.returncode == 0, result.stderr[-3000:]
    return ckpt, sha256(root / "ref" / MODEL_FILE), sha256(root / "ref" / QUANT_FILE)


def test_same_seed_same_artifact_with_two_threads(reference, tmp_path):
    """Multi-threaded CPU reductions must not make calibration differ run to run (the thread count may
    change the bits, so the two runs here use the same count). FAST's 4 iterations per block: the runs compare
    with each other, not with the reference, and at 2 threads on a loaded machine 30 took minutes."""
    ckpt, _, _ = reference
    shas = []
    for name in ("a", "b"):
        result = run("quantize.py", *quantize_args(ckpt, tmp_path / name, iters=4), threads=2)
        assert result.returncode == 0, result.stderr[-3000:]
        shas.append(sha256(tmp_path / name / MODEL_FILE))
    assert shas[0] == shas[1]


def next_block(out):
    return json.loads((out / "calib_state" / "state.json").read_text())["next_block"]


def interrupt_mid_calibration(ckpt, out, sig):
    """Start quantize.py, send `sig` once block 0's calibration state is saved; returns (returncode, stderr)."""
    proc = popen("quantize.py", *quantize_args(ckpt, out))
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if next_block(out) >= 1:
                break
        except (OSError, ValueError, KeyError):  # not written yet
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "quantize.py ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_resumes_to_the_same_artifact(reference, tmp_path, sig):
    ckpt, model_sha, quant_sha = reference
    out = tmp_path / "out"
    returncode, stderr = interrupt_mid_calibration(ckpt, out, sig)
    # item 2: nothing that looks like a finished artifact
    assert not (out / MODEL_FILE).exists() and not (out / QUANT_FILE).exists()
    block = next_block(out)
    assert 1 <= block < 6
    if sig == signal.SIGINT:
        assert returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == (f"interrupted; rerun the same command to resume from block "
                                                   f"{block} (state in {out / 'calib_state'})")
        said = [line for line in stderr.splitlines() if "interrupted; " in line or "interrupted: " in line]
        assert len(said) == 1, said  # calib.modes said it too (a new user's trial)
        assert leftovers(out) == []  # Ctrl-C removes half-written temporaries
    else:
        assert returncode == -signal.SIGKILL
    result = run("quantize.py", *quantize_args(ckpt, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming calibration at block {block} from" in result.stderr
    assert sha256(out / MODEL_FILE) == model_sha
    assert sha256(out / QUANT_FILE) == quant_sha
