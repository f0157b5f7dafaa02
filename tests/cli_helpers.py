"""Running the real entry scripts in a subprocess and checking what they leave behind (issue 6)."""
import contextlib
import importlib
import io
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vq4dit.__main__ import COMMANDS
from vq4dit.models.loading import DiTSpec, save_dit
from vq4dit.utils.cli import LOG_FORMAT

ROOT = Path(__file__).resolve().parents[1]
# OMP_WAIT_POLICY PASSIVE: an OpenMP thread waiting at a barrier sleeps instead of spinning; on a loaded 2-core
# machine a 2-thread run otherwise took 81 s instead of 10 (the results are the same: only the waiting changes)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
       "OMP_WAIT_POLICY": "PASSIVE"}
OUTPUT_FILES = ("model.safetensors", "quant_config.json", "samples.npz", "grid.png")
# the cheapest quantize.py run that still calibrates every block of the depth-6 tiny model
FAST = ("--codebook-size", "4", "--kmeans-iters", "2", "--iters", "4", "--calib-samples", "2",
        "--calib-timesteps", "2", "--steps", "4", "--device", "cpu")


def run(script, *args, timeout=300, threads=1):
    env = {**ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


FAST_RUN = ["--num-samples", "2", "--steps", "2", "--device", "cpu", "-q"]  # a sample.py run of seconds

def run_here(script, *args):
    """The entry script's cli(argv) in this process, its outcome as run() reports a subprocess's (returncode, stdout,
    stderr): a case without the 3 s of a new interpreter importing torch. stderr holds the prints and the log's
    warnings (pytest's capture keeps the root logger at WARNING); an exception other than SystemExit propagates (the
    test fails, as a traceback from the real script would fail it)."""
    command = script.removesuffix(".py")
    assert command in COMMANDS, script
    cli = importlib.import_module(f"vq4dit.cli.{command}").cli  # as python -m vq4dit COMMAND finds it
    out, err, code = io.StringIO(), io.StringIO(), 0
    log = logging.StreamHandler(err)
    log.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(log)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    finally:
        logging.getLogger().removeHandler(log)
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


def popen(script, *args):
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt (the Ctrl-C tests would see no effect)
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def leftovers(out):
    """Files under `out` that look like finished outputs or stale temporaries."""
    out = Path(out)
    if not out.exists():
        return []
    return sorted(str(p) for p in out.rglob("*") if p.name in OUTPUT_FILES
                  or (p.name.startswith(".") and p.name.endswith(".tmp")))


def assert_user_error(result, *names, out=None):
    """Exit 2, one `error:` line (the last one) naming every one of `names`, no traceback, no partial output."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    for name in names:
        assert str(name) in errors[0], f"{name!r} not named in {errors[0]!r}"
    if out is not None:
        assert leftovers(out) == []
    return errors[0]


def save_tiny_ckpt(path):
    """The tiny depth-6 DiT-Digits/2 (8x8, 1 channel, 10 classes), randomized, saved with save_dit; returns it."""
    from tests.conftest import randomize

    model = randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build())
    save_dit(model, "DiT-Digits/2", path)
    return model


def cli_error(cli, argv, capsys):
    """Run an entry script's cli(argv) in this process: SystemExit(2), exactly one `error:` line on stderr (info logs
    aside, as a non-quiet run has them), no traceback; returns that line."""
    with pytest.raises(SystemExit) as info:
        cli([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]
    assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
    return lines[0]


def read_by(method, overrides):
    """`overrides` (config keys -> values) without the keys `method` ignores, which quantize refuses: a cheap
    budget written once for every method."""
    from vq4dit.jobs.keys_read import ignored_by

    ignored = ignored_by(method)
    return {k: v for k, v in overrides.items() if k not in ignored}
