"""The sample job on the project's DiT: the ADM npz, same seed -> same bytes whatever the batch size, torchrun
sharding, bad arguments refused before any work; save_all's files (videos, full disks, the pairing record)."""
import errno
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import sample_dit
from vq4dit.jobs.sample import Loaded, Request, sample_shard
from vq4dit.models.adapters import adapter_for
from vq4dit.models.adapters.base import SampleSettings
from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError


@pytest.mark.parametrize("classes,batch_size", [(None, 64), ([2, 7], 2)])
def test_npz_format(tmp_path, tiny_dit, classes, batch_size):
    model, _ = tiny_dit
    images, labels = sample_dit(model, tmp_path, 5, classes=classes, seed=1, steps=3, batch_size=batch_size)
    with np.load(tmp_path / "samples.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1", "labels", "sampling"]  # labels: what arr_1 holds (issue 29)
        arr, lab = npz["arr_0"], npz["arr_1"]
        assert str(npz["labels"]) == "classes"
        assert json.loads(str(npz["sampling"]))["seed"] == 1  # what evaluate.py's pairing check reads
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 3)
    assert lab.dtype == np.int64 and lab.shape == (5,)
    np.testing.assert_array_equal(arr, images)
    np.testing.assert_array_equal(lab, labels)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()  # grey digits as RGB
    if classes:
        assert lab.tolist() == [2, 7, 2, 7, 2]
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "samples.npz"]  # no temporary files left


def test_same_seed_same_bytes_any_batch_size(tmp_path, tiny_dit):
    model, _ = tiny_dit
    arrays = []
    for name, seed, batch_size in [("a", 5, 64), ("b", 5, 2), ("c", 6, 64)]:
        sample_dit(model, tmp_path / name, 5, seed=seed, steps=3, batch_size=batch_size)
        with np.load(tmp_path / name / "samples.npz") as npz:
            arrays.append((npz["arr_0"].tobytes(), npz["arr_1"].tolist()))
    assert arrays[0] == arrays[1]
    assert arrays[0][0] != arrays[2][0]


def shard(model, num_samples, classes=None, **settings):
    return sample_shard(Loaded(model, adapter_for(model), {}), Request(num_samples, classes),
                        SampleSettings(progress=False, **settings), "cpu")


@pytest.mark.parametrize("size", [2, 3])
def test_shards_are_rows_of_the_single_process_run(monkeypatch, tiny_dit, size):
    """Under torchrun rank r samples positions r, r+size, ...: the same images as those rows of a 1-process run."""
    model, _ = tiny_dit
    full, labels = shard(model, 5, seed=2, steps=3)
    for rank in range(size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(size))
        local, local_labels = shard(model, 5, seed=2, steps=3, batch_size=1)
        np.testing.assert_array_equal(local, full[rank::size])
        np.testing.assert_array_equal(local_labels, labels)  # every rank knows all labels
    assert distributed.shard(5, 1, size).tolist() == list(range(1, 5, size))


def test_subsets_and_an_empty_shard(monkeypatch, tiny_dit):
    model, _ = tiny_dit
    full, _ = shard(model, 2, classes=[4], seed=0, steps=2)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    local, labels = shard(model, 2, classes=[4], seed=0, steps=2)
    assert local.shape == (0, 8, 8, 3) and local.dtype == np.uint8
    assert labels.tolist() == [4, 4] and full.shape == (2, 8, 8, 3)


@pytest.mark.parametrize("kwargs,named", [({"num_samples": 0}, "--num-samples 0"), ({"steps": 0}, "--steps 0"),
                                          ({"steps": -3}, "--steps -3"), ({"steps": 1001}, "--steps 1001"),
                                          ({"batch_size": 0}, "--batch-size 0")])
def test_sample_to_dir_rejects_bad_arguments(tmp_path, tiny_dit, kwargs, named):
    model, _ = tiny_dit
    with pytest.raises(UserError, match=named):
        sample_dit(model, tmp_path / "out", **{"num_samples": 2, "steps": 2, **kwargs})
    assert not (tmp_path / "out").exists()




@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_job_loads_models_in_the_requested_precision(tmp_path, tiny_dit, precision, dtype):
    """sample.py --precision reaches the network through load_for_sampling, for a checkpoint and an artifact;
    codeword indices keep their integer dtype."""
    from vq4dit.jobs.config import load_config
    from vq4dit.jobs.quantize import quantize
    from vq4dit.jobs.sample import FPSource, load_for_sampling
    from vq4dit.models.loading import save_dit
    from vq4dit.vq.layer import VQLinear

    model, spec = tiny_dit
    save_dit(model, spec.name, tmp_path / "tiny.safetensors")
    fp, _, _ = load_for_sampling(source=FPSource(ckpt=str(tmp_path / "tiny.safetensors")), precision=precision)
    assert {p.dtype for p in fp.parameters()} == {dtype}
    quantize(load_config(overrides={"ckpt": str(tmp_path / "tiny.safetensors"), "method": "kmeans",
                                    "codebook_size": 16, "kmeans_iters": 2, "device": "cpu"}), str(tmp_path / "art"),
             progress=False)
    q, _, _ = load_for_sampling(quantized=str(tmp_path / "art"), precision=precision)
    layer = next(m for m in q.modules() if isinstance(m, VQLinear))
    assert layer.codebook.dtype == dtype and layer.indices.dtype == torch.uint8


# ---- save_all: the files of a run (videos, full disks, what a paired comparison checks) --------------------------

def video_batch():
    return np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)  # (N, F, H, W, 3)


def test_a_full_disk_at_a_video_frame_leaves_no_frame_and_no_npz(tmp_path, monkeypatch):
    """Videos are written before the npz, into a temporary directory: ENOSPC at the 4th frame is one line naming
    out/videos, and neither frames nor samples.npz stay (mutation: frames written in place -> 3 frames left)."""
    from vq4dit.jobs.sample import save_all

    real_save, calls = Image.Image.save, []

    def fill_up(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fill_up)
    with pytest.raises(UserError) as info:
        save_all(str(tmp_path), video_batch(), np.array([0, 1]), SampleSettings(), ["a", "b"])
    assert str(info.value).startswith(f"{tmp_path / 'videos'}: no space left on the device")
    assert os.listdir(tmp_path) == []


def test_videos_without_an_mp4_writer_fall_back_to_frames_with_one_warning(tmp_path, monkeypatch, caplog):
    """imageio without its ffmpeg plugin (TiffWriter took the call and refused fps): frames, and one warning for
    all videos (mutation: TypeError not caught -> the run fails after sampling)."""
    import types

    from vq4dit.jobs.sample import save_all

    def mimwrite(path, frames, fps, format=None):
        open(path, "wb").close()  # a writer that created its file before failing
        raise TypeError("TiffWriter.write() got an unexpected keyword argument 'fps'")

    fake = types.ModuleType("imageio")
    fake.v2 = types.SimpleNamespace(mimwrite=mimwrite)
    monkeypatch.setitem(sys.modules, "imageio", fake)
    monkeypatch.setitem(sys.modules, "imageio.v2", fake.v2)
    with caplog.at_level(logging.WARNING, logger="vq4dit.utils.imagefiles"):
        save_all(str(tmp_path), video_batch(), np.array([0, 1]), SampleSettings(), ["a", "b"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "TiffWriter" in warnings[0] and "PNG frames only" in warnings[0]
    assert sorted(os.listdir(tmp_path / "videos")) == ["00000", "00001"]
    assert sorted(os.listdir(tmp_path / "videos" / "00001")) == ["000.png", "001.png", "002.png"]


def test_samples_of_other_prompts_are_not_a_reference(tmp_path):
    """Text-to-image samples keep prompt indices in arr_1, so samples of "a red car" paired with a reference of
    "a cat" (same seed, steps) passed the pairing check; sample.py now records a digest of the prompts (mutation:
    the digest not recorded -> the pair accepted)."""
    from vq4dit.evaluation.samples import check_pairing
    from vq4dit.jobs.sample import save_all
    from vq4dit.utils.imagefiles import save_samples

    images = np.zeros((2, 8, 8, 3), np.uint8)
    for name, prompts in (("cat", ["a cat", "a cat"]), ("car", ["a red car", "a red car"]), ("cat2", ["a cat"] * 2)):
        (tmp_path / name).mkdir()
        save_all(str(tmp_path / name), images, np.array([0, 0]), SampleSettings(), prompts)
    check_pairing(tmp_path / "cat2" / "samples.npz", tmp_path / "cat" / "samples.npz")
    with pytest.raises(UserError, match=r"the reference was sampled with prompts '[0-9a-f]{16}' \(the samples: "):
        check_pairing(tmp_path / "car" / "samples.npz", tmp_path / "cat" / "samples.npz")
    # other prompt lists (another count, so other indices in arr_1): evaluate.py named a label, as of class ids
    # (a new user's trial); the recorded prompts are named first (mutation: the labels checked first)
    from vq4dit.evaluation.report import paired_metrics

    (tmp_path / "two").mkdir()
    save_all(str(tmp_path / "two"), images, np.array([0, 1]), SampleSettings(), ["a cat", "a dog"])
    with pytest.raises(UserError, match=r"the reference was sampled with prompts '[0-9a-f]{16}' \(the samples: "):
        paired_metrics(images, np.array([0, 1]), tmp_path / "two" / "samples.npz", tmp_path / "cat" / "samples.npz")
    (tmp_path / "old").mkdir()  # an older sample.py's file records no digest: not known to differ
    save_samples(str(tmp_path / "old"), images, np.array([0, 0]), True, {"seed": 0, "steps": 50, "cfg_scale": 1.5,
                                                                          "num_frames": None, "vae": "ema"})
    check_pairing(tmp_path / "old" / "samples.npz", tmp_path / "cat" / "samples.npz")
