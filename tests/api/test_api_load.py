"""vq4dit.load_transformer: an artifact directory or a hub repo (huggingface_hub's cache, offline) as the transformer of
a user's own diffusers pipeline, with the artifact's digest checks; docs/api.md's examples, run as written."""
import re
import textwrap
from pathlib import Path

import pytest
import torch

from tests.api.hub_cache import put_in_hub_cache
from tests.api.tiny_lora import make_lora, tiny_run
from vq4dit import load_transformer
from vq4dit.utils.errors import UserError
from vq4dit.vq import load_quantized

DOCS = Path(__file__).parents[2] / "docs" / "api.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)  # the documented examples, in order


def test_api_examples_run_offline_from_the_hub_cache(offline_cache, tmp_path, tmp_path_factory, monkeypatch):
    """docs/api.md's examples as written, each in its own namespace, in the page's order. Loading: the artifact, the
    base pipeline and a LoRA all come by hub id from the cache; the pipeline's transformer is the quantized one with
    the LoRA beside its VQ layers. Quantizing in memory: the base pipeline from the cache is the teacher; its
    transformer, quantized in place, computes what the saved artifact loads back as."""
    from diffusers import StableDiffusion3Pipeline

    from vq4dit.vq.lora import QuantLoraLinear

    run = tiny_run("sd3", tmp_path_factory)
    lora, config = make_lora(StableDiffusion3Pipeline.from_pretrained(run.pipeline).transformer)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=lora,
                                               transformer_lora_adapter_metadata=config)
    put_in_hub_cache(offline_cache, "someone/sd3.5-medium-vq4dit-w2", run.artifact)
    put_in_hub_cache(offline_cache, "stabilityai/stable-diffusion-3.5-medium", run.pipeline)
    put_in_hub_cache(offline_cache, "someone/sd3.5-style-lora", tmp_path / "lora")
    monkeypatch.chdir(tmp_path)  # the examples write relative paths
    assert len(EXAMPLES) == 2, "a new example in docs/api.md gets its run and its checks here"
    load, quantize = {}, {}
    exec(textwrap.dedent(EXAMPLES[0]), load)
    assert load["image"].size == (8, 8)
    wrapped = [m for m in load["pipe"].transformer.modules() if isinstance(m, QuantLoraLinear)]
    assert wrapped and all(m.scaling["style"] == 0.8 * config["lora_alpha"] / config["r"] for m in wrapped)
    exec(textwrap.dedent(EXAMPLES[1]), quantize)
    assert quantize["image"].size == (8, 8)
    in_memory, loaded = quantize["pipe"].transformer.state_dict(), quantize["transformer"].state_dict()
    assert in_memory.keys() == loaded.keys() and all(torch.equal(in_memory[k], loaded[k]) for k in loaded)
    assert (tmp_path / "sd3.5-medium-vq4dit-w1" / "quant_config.json").is_file()
    assert quantize["quantized"].config.codebooks.k == 16  # what the example says it asks for


def test_hub_id_loads_the_same_model_as_the_directory_with_the_same_digest_checks(offline_cache, tmp_path_factory):
    run = tiny_run("sd3", tmp_path_factory)
    snapshot = put_in_hub_cache(offline_cache, "someone/sd3-vq", run.artifact)
    from_hub, (from_dir, _, _) = load_transformer("someone/sd3-vq"), load_quantized(run.artifact)
    assert from_hub.state_dict().keys() == from_dir.state_dict().keys()
    assert all(torch.equal(t, from_dir.state_dict()[k]) for k, t in from_hub.state_dict().items())
    blob = (snapshot / "model.safetensors").resolve()  # the cache's blob, as a download stores it
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 differs"):
        load_transformer("someone/sd3-vq")
    with pytest.raises(UserError, match=r"someone/absent: not a local directory, and fetching it as a hub repo"):
        load_transformer("someone/absent")


def test_device_and_dtype(tmp_path_factory):
    """dtype casts codebooks, biases and full-precision layers; indices keep their integer dtype; bad dtype is a
    one-line UserError."""
    from vq4dit.vq.layer import VQLinear

    run = tiny_run("sd3", tmp_path_factory)
    model = load_transformer(run.artifact, device="cpu", dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, VQLinear)]
    assert layers and all(m.codebook.dtype == torch.bfloat16 and m.indices.dtype == torch.uint8 for m in layers)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    with pytest.raises(UserError, match="dtype=torch.int8"):
        load_transformer(run.artifact, dtype=torch.int8)
    # a bad device blamed the artifact ("model.safetensors: unreadable (device gpu is invalid)"), and cuda without a
    # GPU was a raw pin_memory RuntimeError (mutation: the device not resolved first)
    with pytest.raises(UserError, match="^load_transformer: device gpu: use auto, cpu, cuda or cuda:N$"):
        load_transformer(run.artifact, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="^load_transformer: device cuda: CUDA is not available here"):
            load_transformer(run.artifact, device=torch.device("cuda"))


def test_sample_job_loads_an_artifact_by_hub_id(offline_cache, tmp_path_factory):
    """sample.py --quantized owner/name: the sample job resolves a hub id through the cache (mutation: the job
    passing the id to load_quantized as a path)."""
    from vq4dit.jobs.sample import load_for_sampling

    run = tiny_run("sd3", tmp_path_factory)
    put_in_hub_cache(offline_cache, "someone/sd3-vq-sample", run.artifact)
    by_id, _, _ = load_for_sampling(quantized="someone/sd3-vq-sample")
    by_dir, _, _ = load_for_sampling(quantized=str(run.artifact))
    a, b = by_id.state_dict(), by_dir.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_pipeline_or_samples_directory_is_named_for_what_it_is(tmp_path):
    """load_transformer(PIPELINE_DIR) or (SAMPLES_DIR) said "quant_config.json: missing; ... (interrupted save?)";
    a pipeline (model_index.json) and a directory whose marker says it holds samples are now named (mutations:
    either check left out -> the interrupted-save message)."""
    from vq4dit.utils.outdir import claim_out_dir

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match=rf"^{tmp_path / 'pipe'}: a diffusers pipeline directory, not a quantized"):
        load_transformer(tmp_path / "pipe")
    with claim_out_dir(tmp_path / "samples", ("samples.npz",), tool="sample.py's samples"):
        pass
    with pytest.raises(UserError, match=rf"^{tmp_path / 'samples'}: holds sample.py's samples, not a quantized"):
        load_transformer(tmp_path / "samples")
    with claim_out_dir(tmp_path / "half", ("model.safetensors",), tool="a quantized artifact"):
        pass
    with pytest.raises(UserError, match=r"quant_config.json: missing; .* \(interrupted save\?\)"):
        load_transformer(tmp_path / "half")


@pytest.mark.parametrize("source, revision, message", [
    (42, None, r"^42: give an artifact directory or a hub repo id"),
    ("", None, r"^'': give an artifact directory"),
    (".", "v1", r"^revision='v1': only used with a hub repo id; . is a local path"),
])
def test_a_source_that_is_no_path_or_a_revision_of_a_directory_is_refused(source, revision, message):
    """load_transformer(42) was a raw TypeError, ("") said ": not a directory", and revision= with a local directory
    was ignored (mutations: each check left out)."""
    with pytest.raises(UserError, match=message):
        load_transformer(source, revision=revision)
