"""A diffusers DiTPipeline is quantized natively: its DiTTransformer2DModel, in its own layer names."""
import re

import pytest
import torch

from tests.cli_helpers import read_by
from tests.models.tiny_pipelines import save_tiny_dit_pipeline
from vq4dit.jobs.config import load_config
from vq4dit.jobs.quantize import quantize
from vq4dit.vq import load_quantized
from vq4dit.vq.layer import VQLinear

pytest.importorskip("diffusers")
FAST = {"codebook_size": 16, "kmeans_iters": 3, "iters": 4, "calib_samples": 2, "calib_timesteps": 2, "steps": 3,
        "device": "cpu"}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit_pipeline")
    save_tiny_dit_pipeline(path)
    return path


@pytest.mark.parametrize("method", ["vq4dit", "rtn"])
def test_pipeline_transformer_is_quantized_in_diffusers_form(pipeline_dir, tmp_path, method):
    config = load_config(overrides={"ckpt": str(pipeline_dir), "method": method, **read_by(method, FAST)})
    quantize(config, str(tmp_path / "art"), progress=False)
    model, ref, quant = load_quantized(tmp_path / "art")
    assert type(model).__name__ == "DiTTransformer2DModel"
    assert ref["class"].endswith("DiTTransformer2DModel") and ref["pipeline"]["class"] == "DiTPipeline"
    assert ref["pipeline"]["source"] == str(pipeline_dir.resolve())
    names = sorted(quant["layers"])
    per_block = ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v", "ff.net.0.proj", "ff.net.2",
                 "norm1.linear"]
    assert names == [f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block]
    assert not any(re.search(r"norm1\.emb", n) for n in names)  # the embedder copies stay in full precision
    assert isinstance(model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1, torch.nn.Linear)
    if method == "vq4dit":
        assert isinstance(model.transformer_blocks[1].attn1.to_q, VQLinear)
    x = torch.randn(2, 4, 8, 8)
    out = model(x, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([3, 1000])).sample
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()


def test_backend_vq4dit_maps_the_pipeline_into_the_projects_dit(tmp_path):
    """The mapping into the original architecture stays available (a registry architecture: DiT-Digits/2)."""
    save_tiny_dit_pipeline(tmp_path / "pipe", num_classes=10, layers=6, heads=4, head_dim=32)
    config = load_config(overrides={"ckpt": str(tmp_path / "pipe"), "backend": "vq4dit", "method": "rtn",
                                    "device": "cpu"})
    quantize(config, str(tmp_path / "art"), progress=False)
    model, ref, quant = load_quantized(tmp_path / "art")
    assert ref["class"] == "vq4dit.models.dit.DiT" and ref["name"] == "DiT-Digits/2"
    assert "blocks.0.attn.qkv" in quant["layers"] and len(quant["layers"]) == 6 * 5


def test_a_quantized_pipeline_samples_through_its_pipeline(pipeline_dir, tmp_path):
    """sample: the DiTPipeline the artifact came from (its VAE and scheduler) with the quantized transformer;
    grid.png + ADM npz; the same seed gives the same images, another seed other images."""
    from vq4dit.jobs.sample import Request, load_for_sampling, sample_to_dir
    from vq4dit.models.adapters.base import SampleSettings

    config = load_config(overrides={"ckpt": str(pipeline_dir), **FAST})
    quantize(config, str(tmp_path / "art"), progress=False)
    loaded, request = load_for_sampling(quantized=str(tmp_path / "art")), Request(5, classes=[7, 3])
    settings = SampleSettings(steps=3, batch_size=2, progress=False)
    images, labels = sample_to_dir(loaded, str(tmp_path / "a"), request, settings)
    assert images.shape == (5, 8, 8, 3) and images.dtype == "uint8" and list(labels) == [7, 3, 7, 3, 7]
    assert (tmp_path / "a" / "grid.png").is_file() and (tmp_path / "a" / "samples.npz").is_file()
    again, _ = sample_to_dir(loaded, str(tmp_path / "b"), request, settings)
    other, _ = sample_to_dir(loaded, str(tmp_path / "c"), request, SampleSettings(seed=1, steps=3, batch_size=2,
                                                                                 progress=False))
    assert (again == images).all() and not (other == images).all()
