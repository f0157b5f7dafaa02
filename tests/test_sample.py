"""sample.py end to end on a tiny saved checkpoint: files written, torchrun sharding, bad input -> one error line."""
import errno
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_helpers import FAST_RUN, cli_error, leftovers, run_here
from tests.conftest import sample_dit
from vq4dit.cli import sample
from vq4dit.models.loading import load_dit, save_dit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "sample.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def ckpt(tmp_path, tiny_dit):
    model, spec = tiny_dit
    path = tmp_path / "tiny.safetensors"
    save_dit(model, spec.name, path)
    return path


def reference_run(ckpt, tmp_path, **kwargs):
    """The single-process result computed in-process from the same file."""
    model, _ = load_dit(None, str(ckpt))
    num_samples, classes = kwargs.pop("num_samples"), kwargs.pop("classes", None)
    return sample_dit(model, tmp_path / "reference", num_samples, classes, **kwargs)


def read_npz(path):
    with np.load(path) as npz:
        return npz["arr_0"], npz["arr_1"]


def run(args, timeout=60):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_cli_writes_grid_and_npz(tmp_path, ckpt):
    out = tmp_path / "out"
    proc = run([SCRIPT, "--ckpt", str(ckpt), "--num-samples", "5", "--steps", "3", "--classes", "0,1",
                "--batch-size", "2", "--seed", "4", "--device", "cpu", "--out", str(out), "-q"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(out)) == [".vq4dit", "grid.png", "samples.npz"]  # the marker of utils/outdir.py
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
    images, labels = read_npz(out / "samples.npz")
    ref_images, ref_labels = reference_run(ckpt, tmp_path, num_samples=5, classes=[0, 1], steps=3, seed=4)
    assert labels.tolist() == [0, 1, 0, 1, 0] == ref_labels.tolist()
    np.testing.assert_array_equal(images, ref_images)


def test_one_bar_counts_the_whole_runs_samples(tmp_path, ckpt):
    """sample.py's progress: one bar of all the run's samples, moving after each batch, beside an erased bar of each
    batch's steps (mutation: a bar per batch, as before: 0/4 .. 4/4, then 0/4 again, never the run's 10 samples)."""
    import re

    proc = run_here("sample.py", "--ckpt", ckpt, "--num-samples", "10", "--batch-size", "4", "--steps", "3",
                    "--device", "cpu", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = [(int(n), int(total)) for n, total in re.findall(r"sampling: +\d+%\|[^|]*\| (\d+)/(\d+)", proc.stderr)]
    shown = [n for n, _ in counts]  # tqdm redraws at most every 0.1 s: not every batch's count is shown
    assert {total for _, total in counts} == {10} and shown == sorted(shown) and shown[-1] == 10
    assert re.search(r"steps: +\d+%\|[^|]*\| \d+/3", proc.stderr)


def torchrun_available():
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not torchrun_available(), reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_match_one(tmp_path, ckpt, monkeypatch):
    """5 samples over 2 gloo ranks (3 + 2, batch 2): rank 0 writes the same npz as a single process. The run
    resumes a single process's run interrupted after samples 0-3, whose kept batches are planted inverted: each rank
    takes its kept batch (rank 0 samples 0-1, rank 1 samples 2-3) instead of drawing it, and rank 0 removes the
    state at the end (mutations: a rank drawing its kept batch again, the state left behind)."""
    import vq4dit.models.adapters.dit as dit_adapter

    out = tmp_path / "dist"
    flags = ["--ckpt", str(ckpt), "--num-samples", "5", "--steps", "3", "--batch-size", "2", "--seed", "7",
             "--device", "cpu", "--out", str(out), "-q"]
    calls, generate = [], dit_adapter.generate

    def ctrl_c_after_two_batches(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return generate(*args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(dit_adapter, "generate", ctrl_c_after_two_batches)
        sample.cli(flags)
    for part in ("part-0-2.npz", "part-2-2.npz"):
        path = out / "sample_state" / part
        with np.load(path) as kept:
            indices, planted = kept["indices"], 255 - kept["images"]
        np.savez(path, indices=indices, images=planted)
    try:
        proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, *flags],
                   timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish in 60 s")
    if proc.returncode != 0 and ("gloo" in proc.stderr.lower() or "rendezvous" in proc.stderr.lower()):
        pytest.skip(f"torchrun/gloo could not start here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    images, labels = read_npz(out / "samples.npz")
    ref_images, ref_labels = reference_run(ckpt, tmp_path, num_samples=5, steps=3, batch_size=2, seed=7)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(images[4:], ref_images[4:])  # exact: a sample depends only on (seed, index)
    np.testing.assert_array_equal(images[:4], 255 - ref_images[:4])  # the planted batches, taken
    assert sorted(os.listdir(out)) == [".vq4dit", "grid.png", "samples.npz"]


def bad_inputs(ckpt):
    cases = [(["--ckpt", str(ckpt.parent / "missing.safetensors")], "missing.safetensors"),
             (["--ckpt", str(ckpt), "--num-samples", "0"], "--num-samples 0"),
             (["--ckpt", str(ckpt), "--steps", "0"], "--steps 0"),
             (["--ckpt", str(ckpt), "--steps", "-2"], "--steps -2"),
             (["--ckpt", str(ckpt), "--classes", "12"], "0..9")]
    if not torch.cuda.is_available():
        cases.append((["--ckpt", str(ckpt), "--device", "cuda"], "CUDA"))
    return cases


def test_bad_inputs_exit_2_with_one_error_line(tmp_path, ckpt, monkeypatch, capsys):
    """Each bad input, run as `python sample.py` would (the __main__ block, in this process to save start-up time)."""
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    for args, named in bad_inputs(ckpt):
        monkeypatch.setattr(sys, "argv", [SCRIPT, *args, "--out", str(tmp_path / "out"), "-q"])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(SCRIPT, run_name="__main__")
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2, args
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], (args, err)
        assert not (tmp_path / "out" / "samples.npz").exists()


def test_bad_input_in_a_real_process(tmp_path, ckpt):
    """--classes is checked after the model load: with -q the load's info log stays off stderr."""
    proc = run([SCRIPT, "--ckpt", str(ckpt), "--classes", "3,12", "--device", "cpu", "--out", str(tmp_path / "o"),
                "-q"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --classes '3,12': 12 out of range"), proc.stderr


def test_decoded_weights_sample_the_same_images(tmp_path, tiny_dit):
    from vq4dit.vq import CodebookSpec, quantize_linears, reference, save_quantized

    model, spec = tiny_dit
    for layer in quantize_linears(model, CodebookSpec(4, 4, kmeans_iters=2), progress=False).values():
        layer.harden()
    save_quantized(model, reference(model, name=spec.name), tmp_path / "art", {"method": "kmeans"})
    outs = []
    for name, extra in (("compressed", []), ("decoded", ["--decode-weights"])):
        out = tmp_path / name
        result = run([SCRIPT, "--quantized", str(tmp_path / "art"), *extra, "--num-samples", "3", "--steps", "3",
                      "--device", "cpu", "-q", "--out", str(out)])
        assert result.returncode == 0, result.stderr[-2000:]
        outs.append(read_npz(out / "samples.npz"))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])


# ---- issue 20: every number and mode flag checked before any work; full disks; torchrun ---------------------------


def test_a_count_that_cannot_fit_in_memory_is_refused_before_sampling(tmp_path, capsys):
    line = cli_error(sample.cli, ["--num-samples", 10**12, "--steps", 2, "--device", "cpu", "-q", "--out",
                                  tmp_path / "out"], capsys)
    assert "--num-samples 1000000000000: 1,000,000,000,000 images of 16x16 need about" in line
    assert "MiB of memory; this machine has" in line
    assert leftovers(tmp_path) == []


def test_too_little_free_space_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    """Mutation: no free-space check (the disk fills after all the sampling)."""
    import vq4dit.jobs.sample

    monkeypatch.setattr("vq4dit.utils.fileio.shutil.disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9, 5000))
    monkeypatch.setattr(vq4dit.jobs.sample, "draw_shard", lambda *a, **k: pytest.fail("sampled first"))
    line = cli_error(sample.cli, ["--num-samples", 2, "--steps", 2, "--device", "cpu", "-q", "--out",
                                  tmp_path / "out"], capsys)
    assert f"{tmp_path / 'out'}: samples.npz and grid.png with the batches kept until then need about" in line
    assert "only 5,000 are free" in line
    assert leftovers(tmp_path) == []


def test_a_disk_that_fills_while_writing_leaves_no_npz_without_its_grid(tmp_path, monkeypatch, capsys):
    """The case of issue 20: samples.npz written, grid.png failing with ENOSPC -> one line, exit 2, neither file
    and no temporary; the samples drawn stay in out/sample_state, which the line says, and the same command, once
    there is space, writes both without drawing again (mutation: the state removed on any failure)."""
    import vq4dit.models.adapters.dit

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    argv = ["--num-samples", 2, "--steps", 2, "--device", "cpu", "-q", "--out", tmp_path / "out"]
    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", full)
        line = cli_error(sample.cli, argv, capsys)
    out = tmp_path / "out"
    assert f"{out / 'samples.npz'} + {out / 'grid.png'}: no space left on the device (needed " in line
    assert line.endswith(f"; 2 samples kept in {out / 'sample_state'}: a rerun with the same flags (any "
                         "--batch-size) draws only the rest")
    assert sorted(os.listdir(out)) == [".vq4dit", "sample_state"] and leftovers(tmp_path) == []
    monkeypatch.setattr(vq4dit.models.adapters.dit, "generate", lambda *a, **k: pytest.fail("drawn again"))
    sample.cli([str(a) for a in argv])
    assert sorted(os.listdir(out)) == [".vq4dit", "grid.png", "samples.npz"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_the_error_is_printed_once(tmp_path, monkeypatch, capsys, rank):
    """Every rank parses the same flags; only rank 0 prints (usage errors too), every rank exits 2."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["--cfg-scale", "nan"], ["--steps", "many"]):
        with pytest.raises(SystemExit) as info:
            sample.cli([*argv, "--out", str(tmp_path / "out"), "-q"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and ("--cfg-scale nan" in err or "--steps: invalid int value" in err) == \
            (rank == "0")
        assert err.count("error:") == (1 if rank == "0" else 0)


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                 RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                              "allocate memory: you tried to allocate 99999999999 bytes")])
def test_a_batch_that_runs_out_of_memory_names_batch_size(tmp_path, monkeypatch, capsys, oom):
    """Mutation: no translation (a torch traceback); other RuntimeErrors still propagate (checked below)."""
    import vq4dit.models.adapters.dit

    def fail(*args, **kwargs):
        raise oom

    monkeypatch.setattr(vq4dit.models.adapters.dit, "generate", fail)
    argv = ["--num-samples", 3, "--steps", 2, "--batch-size", 3, "--device", "cpu", "-q", "--out", tmp_path / "out"]
    line = cli_error(sample.cli, argv, capsys)
    assert line == f"error: --batch-size 3: out of memory drawing 3 samples at once ({type(oom).__name__}); lower " \
                   "--batch-size"
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(vq4dit.models.adapters.dit, "generate",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        sample.cli([str(a) for a in argv])


# ---- issue 29: interrupts, the --out claim, full disks at every write, non-finite images, ignored flags -------------

@pytest.mark.parametrize("signum,code,line", [(None, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_an_interrupt_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, signum, code, line):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM while sampling: one line, exit 130 / 143, and neither files nor the
    directory the run created (mutation: run_cli without a hint for sample.py -> the 60-line traceback; the claim's
    marker kept -> out/.vq4dit left)."""
    import vq4dit.models.adapters.dit

    def interrupt(*args, **kwargs):
        if signum is None:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
        time.sleep(5)

    monkeypatch.setattr(vq4dit.models.adapters.dit, "generate", interrupt)
    out = tmp_path / "a" / "out"
    with pytest.raises(SystemExit) as info:
        sample.cli([*FAST_RUN, "--out", str(out)])
    assert info.value.code == code
    assert capsys.readouterr().err.splitlines() == [f"{line}; nothing written to {out}"]
    assert os.listdir(tmp_path) == []


def test_out_is_claimed_as_quantize_out_is(tmp_path, capsys):
    """A second run into a --out being written is refused naming the first's pid; files sample.py did not write
    are refused unless --overwrite, and kept then (mutation: --out not claimed -> both runs write, a project's
    files beside the samples silently)."""
    from vq4dit.jobs.sample import claim_sample_dir

    out = tmp_path / "out"
    with claim_sample_dir(out):
        line = cli_error(sample.cli, [*FAST_RUN, "--out", out], capsys)
    assert f"{out}: another run (pid {os.getpid()}) is writing to it" in line
    (out / "notes.txt").write_text("mine")
    line = cli_error(sample.cli, [*FAST_RUN, "--out", out], capsys)
    assert "holds files vq4dit did not write (notes.txt)" in line and "--overwrite" in line
    sample.cli([*FAST_RUN, "--out", str(out), "--overwrite"])
    assert sorted(os.listdir(out)) == [".vq4dit", "grid.png", "notes.txt", "samples.npz"]
    assert (out / "notes.txt").read_text() == "mine"


def test_a_full_disk_at_the_first_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC inside np.savez (the first write: the first batch kept for a rerun): one line naming the file, nothing
    left (mutation: atomic_paths not reporting a full disk -> an OSError traceback)."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    out = tmp_path / "out"
    line = cli_error(sample.cli, [*FAST_RUN, "--out", out], capsys)
    assert f"{out / 'sample_state' / 'part-0-2.npz'}: no space left on the device" in line
    assert os.listdir(tmp_path) == []


def test_non_finite_images_are_an_error_naming_the_cause(tmp_path, monkeypatch, capsys):
    """A model that overflows (a LoRA at scale 1e30 did) gives NaN, which uint8 made black images with exit 0
    (mutation: no check in images_to_uint8)."""
    import vq4dit.models.adapters.dit

    monkeypatch.setattr(vq4dit.models.adapters.dit, "generate",
                        lambda model, labels, *a, **k: torch.full((len(labels), 1, 16, 16), float("nan")))
    out = tmp_path / "out"
    line = cli_error(sample.cli, [*FAST_RUN, "--out", out], capsys)
    assert line.startswith("error: samples 0..1: the sampled images hold 512 NaN/Inf value(s): an overflow (a LoRA ")
    assert os.listdir(tmp_path) == []


def test_a_pipelines_non_finite_images_are_refused_too():
    """The diffusers path (SD3, Flux, PixArt: a LoRA at scale 1e30 gave NaN latents, then black PNGs): the
    pipeline's float images hold NaN (mutation: no check in to_uint8_images)."""
    from vq4dit.models.pipelines import to_uint8_images
    from vq4dit.utils.errors import NonFiniteOutput

    images = np.full((2, 4, 4, 3), 0.5, np.float32)
    assert (to_uint8_images(images) == 128).all()
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteOutput, match=r"^the pipeline's images hold 1 NaN/Inf value\(s\)$"):
        to_uint8_images(images)


def test_videos_record_the_frames_they_hold(tmp_path):
    """samples.npz records the frames drawn, not the flag: the calibrated default recorded null and diffusers' rounding
    of --num-frames 4 to 5 recorded 4, so evaluate.py refused a reference drawn with --num-frames 5 (mutation: the
    flag recorded)."""
    from vq4dit.evaluation.samples import sampling_of
    from vq4dit.jobs.sample import save_all
    from vq4dit.models.adapters.base import SampleSettings

    videos = np.zeros((2, 5, 8, 8, 3), np.uint8)
    for name, frames in (("default", None), ("rounded", 4)):
        save_all(tmp_path / name, videos, [0, 1], SampleSettings(num_frames=frames), prompts=["a", "b"])
        assert sampling_of(tmp_path / name / "samples.npz")["num_frames"] == 5


