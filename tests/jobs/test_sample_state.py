"""Resuming sample.py (jobs/sample_state.py): the batches an interrupted run drew are kept in OUT/sample_state, and
the rerun draws only the rest and writes the samples.npz an uninterrupted run writes."""
import json
import logging
import os
import shutil

import numpy as np
import pytest

import vq4dit.jobs.sample as sample_job
from tests.api.hub_cache import put_in_hub_cache
from tests.cli_helpers import run_here, save_tiny_ckpt
from vq4dit.jobs.sample import FPSource, Loaded, Request, Resume, sample_to_dir
from vq4dit.jobs.sample_state import KEY_FILE, STATE_DIR, source_key
from vq4dit.models.adapters import adapter_for
from vq4dit.models.adapters.base import SampleSettings
from vq4dit.utils.errors import UserError

SOURCE = {"model": "the tiny DiT of the test"}  # what source_key records, for runs of one in-memory model
PREPARE = sample_job.prepare_sampler


def counted(monkeypatch, stop_after=None, error=KeyboardInterrupt):
    """Wrap the sampler of every run: the sample indices it draws are appended to the list returned; with
    `stop_after`, the batch after that many raises `error` (default: a Ctrl-C mid-run)."""
    drawn = []

    def prepare(*args):
        sampler = PREPARE(*args)

        def draw(idx, conditions):
            if stop_after is not None and len(drawn) >= stop_after:
                raise error
            drawn.append(list(idx))
            return sampler(idx, conditions)
        return type(sampler)(draw, sampler.size)
    monkeypatch.setattr(sample_job, "prepare_sampler", prepare)
    return drawn


def run(model, out, batch_size=4, seed=0, resume=Resume(SOURCE)):
    settings = SampleSettings(seed=seed, steps=3, batch_size=batch_size, progress=False)
    sample_to_dir(Loaded(model, adapter_for(model), {}), str(out), Request(12), settings, "cpu", resume)
    return (out / "samples.npz").read_bytes()


def test_an_interrupted_run_resumes_to_the_uninterrupted_samples(tiny_dit, tmp_path, monkeypatch):
    """Interrupted after 2 batches of 4, rerun at batch size 3: the rerun draws only samples 8-11 (of its batch
    6-8, only 8) and writes the uninterrupted run's bytes; the state is gone after. Mutations: kept batches not
    taken (the rerun draws all 12), a partly kept batch drawn whole, a batch kept under other indices (other
    bytes), the state left behind."""
    model, _ = tiny_dit
    reference = run(model, tmp_path / "ref")  # uninterrupted: the same key, so the same run_key recorded
    assert not (tmp_path / "ref" / STATE_DIR).exists()  # the API without Resume keeps nothing
    out = tmp_path / "out"
    counted(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(model, out)
    assert sorted(os.listdir(out / STATE_DIR)) == ["key.json", "part-0-4.npz", "part-4-4.npz"]
    assert not (out / "samples.npz").exists()
    drawn = counted(monkeypatch)
    assert run(model, out, batch_size=3) == reference
    assert drawn == [[8], [9, 10, 11]]
    assert not (out / STATE_DIR).exists()


def test_a_state_of_another_run_is_refused_and_overwrite_starts_over(tiny_dit, tmp_path, monkeypatch, caplog):
    """A rerun with another seed: a UserError naming the state and the change, the kept batches untouched; with
    overwrite they are dropped (a warning) and every sample is drawn. Mutation: the key without the settings -> the
    other seed's rerun takes seed 0's batches."""
    model, _ = tiny_dit
    out = tmp_path / "out"
    counted(monkeypatch, stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        run(model, out)
    drawn = counted(monkeypatch)
    with pytest.raises(UserError, match=f"{out / STATE_DIR}: holds samples of another sample.py run "
                                         r"\(settings.seed 0 -> 1\); rerun that command"):
        run(model, out, seed=1)
    assert "part-0-4.npz" in os.listdir(out / STATE_DIR) and drawn == []
    with caplog.at_level(logging.WARNING, logger="vq4dit.jobs.sample_state"):
        samples = run(model, out, seed=1, resume=Resume(SOURCE, overwrite=True))
    assert "dropping the samples of another run" in caplog.text
    assert len(drawn) == 3 and samples == run(model, tmp_path / "ref", seed=1)


def test_a_damaged_part_is_drawn_again(tiny_dit, tmp_path, monkeypatch, caplog):
    """A kept batch cut short on disk: a warning naming it, its samples drawn again, the bytes of an uninterrupted
    run. Mutation: a part taken without its checks -> an error or other images."""
    model, _ = tiny_dit
    out = tmp_path / "out"
    counted(monkeypatch, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(model, out)
    part = out / STATE_DIR / "part-4-4.npz"
    part.write_bytes(part.read_bytes()[:300])
    drawn = counted(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="vq4dit.jobs.sample_state"):
        samples = run(model, out)
    assert "part-4-4.npz: unreadable" in caplog.text
    assert sorted(i for idx in drawn for i in idx) == list(range(4, 12))
    assert samples == run(model, tmp_path / "ref")


def test_the_key_follows_the_checkpoints_content(tmp_path):
    """The same path holding another checkpoint is another key (mutation: the key by path only); an artifact's key
    reads its two files only, so samples written inside the artifact (the README's layout) leave it as it was
    (mutation: the whole directory digested -> every kept batch would change the key of its own run)."""
    ckpt = tmp_path / "m.safetensors"
    save_tiny_ckpt(ckpt)
    first = source_key(None, FPSource(ckpt=str(ckpt)))
    from tests.conftest import randomize
    from vq4dit.models.loading import DiTSpec, save_dit

    save_dit(randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build(), seed=5),
             "DiT-Digits/2", ckpt)
    assert source_key(None, FPSource(ckpt=str(ckpt))) != first
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"weights")
    (art / "quant_config.json").write_text("{}")
    before = source_key(str(art), FPSource())
    (art / "samples" / STATE_DIR).mkdir(parents=True)
    (art / "samples" / STATE_DIR / "part-0-4.npz").write_bytes(b"kept")
    assert source_key(str(art), FPSource()) == before
    (art / "model.safetensors").write_bytes(b"other weights")
    assert source_key(str(art), FPSource()) != before


def test_sample_py_interrupted_says_what_it_kept_and_its_rerun_finishes(tmp_path, monkeypatch):
    """sample.py itself (in this process): Ctrl-C after one batch exits 130 with `interrupted; 4 samples kept in
    OUT/sample_state; rerun the same command ...`, and the same command then writes the uninterrupted samples
    (mutation: the hint saying nothing was written; the CLI not passing Resume -> nothing kept)."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    flags = ["--num-samples", "8", "--batch-size", "4", "--steps", "3", "--device", "cpu", "-q"]
    assert run_here("sample.py", *flags, "--out", ref).returncode == 0
    counted(monkeypatch, stop_after=1)
    stopped = run_here("sample.py", *flags, "--out", out)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == (f"interrupted; 4 samples kept in {out / STATE_DIR}; rerun the "
                                                       "same command to draw the rest")
    drawn = counted(monkeypatch)
    assert run_here("sample.py", *flags, "--out", out).returncode == 0
    assert drawn == [[4, 5, 6, 7]]
    assert np.load(out / "samples.npz")["arr_0"].tobytes() == np.load(ref / "samples.npz")["arr_0"].tobytes()


def test_a_resumed_runs_bar_starts_at_the_kept_samples(tmp_path, monkeypatch):
    """The run's bar counts the kept samples from its start, so its rate and time left are the drawing's (mutation: the
    kept batches counted as instant updates -> 0/8 first, and a time left far too short)."""
    import re

    flags = ["--num-samples", "8", "--batch-size", "4", "--steps", "3", "--device", "cpu", "--out", tmp_path / "out"]
    counted(monkeypatch, stop_after=1)
    assert run_here("sample.py", *flags).returncode == 130
    counted(monkeypatch)
    rerun = run_here("sample.py", *flags)
    assert rerun.returncode == 0
    shown = [int(n) for n in re.findall(r"sampling: +\d+%\|[^|]*\| (\d+)/8", rerun.stderr)]
    assert shown[0] == 4 and shown[-1] == 8


@pytest.mark.parametrize("size", [(8, 8), (3, 8, 8)], ids=["images", "videos"])
def test_kept_samples_come_back_by_index(tmp_path, size):
    """SampleState alone: images and videos kept from non-consecutive indices (a part per run of them) come back by
    index, in any grouping, and a part of another shape is not taken (mutations: a run split off by one; the shape
    check dropped)."""
    from vq4dit.jobs.sample_state import SampleState

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, *size, 3), dtype=np.uint8)
    state = SampleState(str(tmp_path), size)
    state.keep([0, 1, 4, 5, 6], images)
    assert sorted(os.listdir(tmp_path)) == ["part-0-2.npz", "part-4-3.npz"]
    again = SampleState(str(tmp_path), size)
    found = again.take([6, 2, 1, 4])
    assert sorted(found) == [1, 4, 6]
    for i, row in zip([0, 1, 4, 5, 6], images):
        assert i not in found or np.array_equal(found[i], row)
    assert SampleState(str(tmp_path), (*size[:-1], size[-1] + 1)).take([0, 5]) == {}


def test_after_an_out_of_memory_batch_a_smaller_batch_size_keeps_what_was_drawn(tmp_path, monkeypatch):
    """sample.py's second batch runs out of memory: one line naming --batch-size and the samples kept, exit 2; the
    same flags at a smaller --batch-size draw only the rest (mutation: the batch size in the key -> refused)."""
    import torch

    out = tmp_path / "out"
    flags = ["--num-samples", "8", "--steps", "3", "--device", "cpu", "-q", "--out", out]
    counted(monkeypatch, stop_after=1, error=torch.OutOfMemoryError("CUDA out of memory"))
    failed = run_here("sample.py", *flags, "--batch-size", "4")
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
        "error: --batch-size 4: out of memory drawing 4 samples at once (OutOfMemoryError); lower --batch-size; 4 "
        f"samples kept in {out / STATE_DIR}: a rerun with the same flags (any --batch-size) draws only the rest")
    drawn = counted(monkeypatch)
    assert run_here("sample.py", *flags, "--batch-size", "2").returncode == 0
    assert drawn == [[4, 5], [6, 7]]


def test_sample_py_keys_a_hub_artifact_by_its_snapshots_files(offline_cache, tmp_path, tmp_path_factory, monkeypatch):
    """sample.py --quantized owner/name, interrupted: the kept batches' key holds the digests of the cached snapshot's
    two files, and a rerun after the repo moved to another revision is refused naming the artifact (mutation: the
    key by the repo id -> the moved repo's samples mixed with the first revision's)."""
    from tests.api.tiny_lora import tiny_run
    from vq4dit.utils.digest import sampled_digest
    from vq4dit.vq import load_quantized, save_quantized

    run = tiny_run("sd3", tmp_path_factory)
    first = put_in_hub_cache(offline_cache, "someone/sd3-vq", run.artifact)
    flags = ["--quantized", "someone/sd3-vq", "--prompt", "a cat", "--num-samples", "2", "--batch-size", "1",
             "--steps", "1", "--device", "cpu", "-q", "--out", tmp_path / "out"]
    counted(monkeypatch, stop_after=1)
    assert run_here("sample.py", *flags).returncode == 130
    key = json.loads((tmp_path / "out" / STATE_DIR / KEY_FILE).read_text())["source"]["model"]["quantized"]
    assert [entry["digest"] for entry in key] == [sampled_digest(first / name)
                                                  for name in ("model.safetensors", "quant_config.json")]
    model, ref, _ = load_quantized(run.artifact)
    save_quantized(model, ref, tmp_path / "moved", {"note": "revision 2"})  # another config.yaml: another artifact
    put_in_hub_cache(offline_cache, "someone/sd3-vq", tmp_path / "moved", revision="1" * 40)
    refused = run_here("sample.py", *flags)
    assert refused.returncode == 2 and "source.model.quantized" in refused.stderr.strip().splitlines()[-1]
    # a commit that changed only the model card: the same two files at another snapshot path, so the rerun resumes
    # (mutation: the key by path -> refused, and the kept batch lost to --overwrite)
    shutil.copytree(run.artifact, tmp_path / "card")
    (tmp_path / "card" / "README.md").write_text("a better card\n")
    put_in_hub_cache(offline_cache, "someone/sd3-vq", tmp_path / "card", revision="2" * 40)
    drawn = counted(monkeypatch)
    assert run_here("sample.py", *flags).returncode == 0 and drawn == [[1]]


def test_skip_existing_keeps_this_runs_samples_and_draws_any_other(tmp_path, monkeypatch):
    """sample.py --skip-existing (run.sh's reruns): the same command keeps the samples and draws nothing; another seed
    draws (mutations: no check -> drawn again; the key not recorded -> never kept). A paired evaluation ignores the
    run key, which names the model too (mutation: compared -> every quantized-vs-FP pair refused)."""
    from vq4dit.evaluation.samples import check_pairing
    from vq4dit.utils.imagefiles import save_samples

    out = tmp_path / "out"
    flags = ["--num-samples", "4", "--batch-size", "4", "--steps", "3", "--device", "cpu", "-q", "--out", out,
             "--skip-existing"]
    assert run_here("sample.py", *flags).returncode == 0
    written = (out / "samples.npz").stat().st_mtime_ns
    drawn = counted(monkeypatch)
    assert run_here("sample.py", *flags).returncode == 0 and drawn == []
    assert (out / "samples.npz").stat().st_mtime_ns == written
    assert run_here("sample.py", *flags, "--seed", "1").returncode == 0 and drawn == [[0, 1, 2, 3]]
    # a truncated samples.npz (a new user's trial: a BadZipFile traceback) is drawn again (mutation: sampling_of
    # reading it unguarded)
    npz = (out / "samples.npz").read_bytes()
    (out / "samples.npz").write_bytes(npz[:-3000])
    assert run_here("sample.py", *flags, "--seed", "1").returncode == 0 and drawn[1:] == [[0, 1, 2, 3]]
    assert (out / "samples.npz").read_bytes() == npz
    images = np.zeros((2, 4, 4, 3), np.uint8)
    save_samples(tmp_path / "q", images, [0, 1], sampling={"seed": 0, "run_key": "a"})
    save_samples(tmp_path / "fp", images, [0, 1], sampling={"seed": 0, "run_key": "b"})
    check_pairing(tmp_path / "q" / "samples.npz", tmp_path / "fp" / "samples.npz")
