"""vq4dit.quantize_transformer: a pipeline's transformer quantized in memory through quantize.py's own stages; the
saved artifact is byte for byte the one quantize.py wrote for the same config (tests/models/tiny_t2i.quantized_run),
and the in-memory model computes what that artifact loads back as."""
import pytest
import torch

from tests.api.tiny_lora import tiny_run
from tests.models.tiny_t2i import sd3_pipeline
from vq4dit import load_transformer, quantize_transformer
from vq4dit.models.adapters import adapter_for
from vq4dit.utils.errors import UserError
from vq4dit.vq.artifact import quantized_layers

ARTIFACT_FILES = ("model.safetensors", "quant_config.json", "config.yaml", "README.md")


def transformer_output(model):
    gen = torch.Generator().manual_seed(0)
    shapes = adapter_for(model).example_inputs(model, rows=2, latent_hw=(8, 8), tokens=5)
    with torch.no_grad():
        return model(**{k: torch.randn(v.shape, generator=gen) for k, v in shapes.items()}, return_dict=False)[0]


def test_saved_artifact_is_the_one_quantize_py_writes_and_loads_as_the_in_memory_model(tmp_path_factory, tmp_path):
    """Mutations caught: the API skipping calibration or the recorded prompts (model.safetensors differs), a model
    reference other than quantize.py's (quant_config.json differs), the in-memory codebooks left unrounded
    (the in-memory output differs from the loaded artifact's)."""
    from diffusers import StableDiffusion3Pipeline

    run = tiny_run("sd3", tmp_path_factory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline))
    transformer = pipe.transformer
    quantized = quantize_transformer(pipe, run.config, work_dir=tmp_path / "work", progress=False)
    assert quantized.transformer is transformer is pipe.transformer
    assert quantized_layers(transformer) and not list((tmp_path / "work").glob("calib_state/*"))
    in_memory = transformer_output(transformer)  # before save, which rounds codebooks in place
    quantized.save(tmp_path / "api")
    for name in ARTIFACT_FILES:
        assert (tmp_path / "api" / name).read_bytes() == (run.artifact / name).read_bytes(), name
    assert torch.equal(in_memory, transformer_output(load_transformer(tmp_path / "api")))


def test_overrides_and_config_resolve_as_quantize_py_flags():
    """Keyword overrides take flat keys over the recipe's defaults (as quantize.py's flags); ckpt is the
    pipeline's source."""
    from vq4dit.jobs.config import load_config
    from vq4dit.quantize import resolved_config

    class Loaded:
        name_or_path = "owner/pipeline"

    got = resolved_config(Loaded(), None, {"wbits": 3, "iters": 7})
    assert got == load_config(overrides={"ckpt": "owner/pipeline", "wbits": 3, "iters": 7})
    assert resolved_config(Loaded(), got, {"dim": 2}) == got.replace(dim=2)
    with pytest.raises(UserError, match=r"ckpt='other/model', but the pipeline was loaded from 'owner/pipeline'"):
        resolved_config(Loaded(), None, {"ckpt": "other/model"})
    with pytest.raises(UserError, match="wbits=0"):
        resolved_config(Loaded(), None, {"wbits": 0})


def test_bad_pipelines_are_one_line_errors(tmp_path):
    """A pipeline built in memory (no source for the teacher's encoders), a bf16 transformer: refused before any
    work, the pipeline untouched."""
    pipe = sd3_pipeline()
    with pytest.raises(UserError, match="not loaded with from_pretrained") as e:
        quantize_transformer(pipe, device="cpu")
    assert "\n" not in str(e.value)
    pipe.save_pretrained(tmp_path / "pipe")
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "pipe"), dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"the transformer is in torch.bfloat16; load the pipeline in float32"):
        quantize_transformer(pipe, device="cpu")
    assert not quantized_layers(pipe.transformer)


def test_uncalibrated_methods_model_in_memory_is_exactly_its_artifact(tmp_path_factory, tmp_path):
    """k-means codebooks are float32 until the artifact rounds them to fp16 (calibration rounds its own): the
    returned transformer is already the artifact's model (mutation: no codec.prepare after quantizing)."""
    from diffusers import StableDiffusion3Pipeline

    run = tiny_run("sd3", tmp_path_factory)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run.pipeline))
    quantized = quantize_transformer(pipe, run.config, progress=False, method="kmeans")
    in_memory = transformer_output(pipe.transformer)
    quantized.save(tmp_path / "kmeans")
    assert torch.equal(in_memory, transformer_output(load_transformer(tmp_path / "kmeans")))
