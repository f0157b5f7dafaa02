"""Issue 29: the writes of quantize.py meet a full disk (in this process, each writer in turn) or a file-size limit
(a real process under `ulimit -f`): one `error:` line naming the file and what refused it, no traceback, no file
that looks finished, and a rerun that resumes."""
import errno
import os
from dataclasses import dataclass

import pytest

from tests.cli_helpers import FAST, assert_user_error, run_here, save_tiny_ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_tiny_ckpt(path)
    return path


def safetensors_full(*args, **kwargs):
    """safetensors' save_file on a full disk: not an OSError, the errno in its text."""
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def text_full(path, text):
    """A text write that fills the disk half way, through the real atomic_path."""
    from vq4dit.utils.fileio import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def card_full(path, text):
    if path.endswith(".tmp") and ".README.md." in path:
        raise OSError(errno.ENOSPC, "No space left on device")
    with open(path, "w") as f:
        f.write(text)


@dataclass(frozen=True)
class FullDisk:
    """A write of quantize.py that meets a full disk: the method that makes it, the writer replaced (`target`) by
    `writer`, and what the error line must name."""

    method: str
    target: str
    writer: object
    named: str


FULL_DISKS = {
    "artifact": FullDisk("rtn", "vq4dit.vq.artifact.save_file", safetensors_full, "model.safetensors"),
    "model-card": FullDisk("rtn", "vq4dit.vq.artifact.write_text", card_full, "README.md"),
    "calibration-state": FullDisk("vq4dit", "vq4dit.calib.checkpoints.save_file", safetensors_full,
                                  "calib_state/layers-"),
    "calibration-log": FullDisk("vq4dit", "vq4dit.calib.checkpoints.write_text_atomic", text_full, "calib_log.jsonl"),
}


@pytest.mark.parametrize("case", FULL_DISKS.values(), ids=FULL_DISKS.keys())
def test_a_full_disk_at_any_write_of_quantize_is_one_line(ckpt, tmp_path, monkeypatch, capsys, case):
    """Mutations: atomic_paths recognising only OSError (safetensors' error -> a traceback); the artifact's files
    written one by one (the card failing -> model.safetensors and config.yaml left without quant_config.json)."""
    from vq4dit.cli import quantize
    from vq4dit.jobs.keys_read import flags_read_by

    monkeypatch.setattr(case.target, case.writer)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        quantize.cli([*flags_read_by({"method": case.method}, [*FAST, "--iters", "1"]), "--ckpt", str(ckpt), "--method",
                      case.method, "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "no space left on the device" in lines[0] and case.named in lines[0], lines[0]
    kept = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert not [n for n in kept if n in ("model.safetensors", "config.yaml", "README.md", "quant_config.json")
                or n.endswith(".tmp")], kept


@pytest.mark.skipif(not hasattr(os, "setpgid"), reason="POSIX resource limits")
def test_a_file_past_the_size_limit_is_one_line_not_a_traceback(ckpt, tmp_path):
    """`ulimit -f` (or a file system's size limit, FAT32's 4 GiB) at the calibration state's first write: EFBIG, from
    safetensors as text. It ended in a traceback (only a full disk was recognised); now one line naming the limit,
    and a rerun without the limit resumes (mutation: WRITE_REFUSED_TEXT left out -> the traceback)."""
    import resource
    import subprocess
    import sys

    from tests.cli_helpers import ENV, ROOT

    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "quantize.py"), *FAST, "--ckpt", str(ckpt), "--out", str(out)]
    limited = subprocess.run(argv, env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"}, cwd=ROOT, capture_output=True,
                             text=True, timeout=300,  # no .pyc: one cut by the limit would break later imports
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)))
    assert_user_error(limited, "file-size limit (ulimit -f)")
    again = run_here("quantize.py", *argv[2:])
    assert again.returncode == 0, again.stderr[-2000:]
