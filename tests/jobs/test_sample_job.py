"""The sample job on the project's DiT: the ADM npz, same seed -> same bytes whatever the batch size, torchrun
sharding, bad arguments refused before any work."""
import json
import os

import numpy as np
import pytest
import torch

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
