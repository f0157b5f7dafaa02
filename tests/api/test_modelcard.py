"""The model card every artifact carries (vq/modelcard.py): hub YAML metadata derived from the artifact, written
without changing a byte of model.safetensors or quant_config.json."""
import math
from unittest import mock

import torch
import yaml
from safetensors.torch import load_file

from tests.api.tiny_lora import tiny_run
from vq4dit.models.dit import DiT
from vq4dit.vq.apply import quantize_linears
from vq4dit.vq.artifact import read_quant_config, save_quantized
from vq4dit.vq.layer import CodebookSpec
from vq4dit.vq.modelcard import hub_id_of, model_card
from vq4dit.vq.modelref import reference

LEGACY = {"name": "DiT-Digits/2", "input_size": 8, "num_classes": 3, "in_channels": 1, "learn_sigma": True}


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_card_leaves_the_artifact_files_byte_identical(tmp_path):
    torch.manual_seed(0)
    model = DiT.from_config(LEGACY)
    quantize_linears(model, CodebookSpec(16, 4, kmeans_iters=2), progress=False, soft=False)
    ref, config = reference(model, name="DiT-Digits/2"), {"wbits": 2, "seed": 0}
    save_quantized(model, ref, tmp_path / "card", config)
    with mock.patch("vq4dit.vq.artifact.model_card", return_value="another card\n"):
        save_quantized(model, ref, tmp_path / "other", config)
    for name in ("model.safetensors", "quant_config.json", "config.yaml"):
        assert (tmp_path / "card" / name).read_bytes() == (tmp_path / "other" / name).read_bytes()
    assert (tmp_path / "other" / "README.md").read_text() == "another card\n"
    meta = front_matter((tmp_path / "card" / "README.md").read_text())
    assert meta["library_name"] == "vq4dit" and "base_model" not in meta  # the project's DiT: no hub base model


def test_card_metadata_is_what_the_artifact_holds(tmp_path_factory):
    """Bits per weight against the stored tensors' sizes (indices and fp16 codebooks) over the weights they
    encode; the config is config.yaml's; the pipeline's hub id becomes base_model."""
    run = tiny_run("sd3", tmp_path_factory)
    text = (run.artifact / "README.md").read_text()
    meta, quant = front_matter(text), read_quant_config(run.artifact)
    tensors = load_file(run.artifact / "model.safetensors")
    weights = sum(e["in_features"] * e["out_features"] for e in quant["layers"].values())
    index_bits = 8 * sum(tensors[f"{n}.indices"].numel() for n in quant["layers"])
    codebook_bits = 16 * sum(tensors[f"{n}.codebook"].numel() for n in quant["layers"])
    q = meta["quantization"]
    assert math.isclose(q["bits_per_weight"], index_bits / weights, rel_tol=1e-3)
    assert math.isclose(q["bits_per_weight_with_codebook"], (index_bits + codebook_bits) / weights, rel_tol=1e-3)
    assert q["method"] == "vq4dit" and q["quantized_layers"] == len(quant["layers"])
    config = yaml.safe_load((run.artifact / "config.yaml").read_text())
    # the config's `model` is the project DiT's registry name, unused for a pipeline (issue 29: the card said
    # `model: DiT-Digits/2` for SD3 and Flux; config.yaml left it out since 2026-12-06): the card names the pipeline
    # instead (mutation: the config as saved)
    source = quant["base_model"]["pipeline"]["source"]
    assert q["config"] == {**config, "model": source} and "model" not in config
    assert f"# {source} (SD3Transformer2DModel), quantized" in text and "DiT-Digits" not in text
    assert meta["library_name"] == "diffusers" and "SD3Transformer2DModel" in meta["tags"]
    assert len(meta["tags"]) == len(set(meta["tags"])), meta["tags"]  # "vq4dit" twice for the vq4dit method
    assert "StableDiffusion3Pipeline.from_pretrained(" in text and "from vq4dit import load_transformer" in text
    ref = {**quant["base_model"], "pipeline": {"class": "StableDiffusion3Pipeline", "source":
           "/cache/hub/models--stabilityai--stable-diffusion-3.5-medium/snapshots/0123abcd"}}
    card = front_matter(model_card(ref, quant["layers"], {}))
    assert card["base_model"] == "stabilityai/stable-diffusion-3.5-medium"
    assert card["base_model_relation"] == "quantized"


def test_hub_id_of_a_pipeline_source():
    assert hub_id_of("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    assert hub_id_of("/home/u/.cache/huggingface/hub/models--owner--name/snapshots/abc") == "owner/name"
    assert hub_id_of("/data/pipelines/flux") is None and hub_id_of("pipeline") is None and hub_id_of(None) is None


def test_the_card_names_the_runs_method_not_the_layer_class(tmp_path):
    """--method kmeans builds VQLinear layers as vq4dit does: the card said `method: vq4dit` and "1 bits" for a k16
    d4 k-means artifact (mutation: the method from the layer class alone)."""
    torch.manual_seed(0)
    model = DiT.from_config(LEGACY)
    quantize_linears(model, CodebookSpec(16, 4, kmeans_iters=2), progress=False, soft=False)
    save_quantized(model, reference(model, name="DiT-Digits/2"), tmp_path / "km", {"method": "kmeans", "seed": 0})
    text = (tmp_path / "km" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["quantization"]["method"] == "kmeans" and "kmeans" in meta["tags"] and "vq4dit" in meta["tags"]
    assert "quantized (kmeans, 1 bit per weight)" in text


def test_a_bit_allocation_is_described_by_each_layers_setting_residual_stages_included():
    """The card merged residual settings into single-stage ones ("9 x k256 d8" for 256x8x2, which stores 2 bits per
    weight, not 1) and dropped the stage count (a fourth new user's trial); it now counts the settings the log and
    quant_config.json have. Mutation: the stage count left out of the count's key -> 13 x k256 d16."""
    from vq4dit.vq.modelcard import allocation_text

    def entry(k, d, stages=None):
        bits = (stages or 1) * math.log2(k) / d
        return {"k": k, "d": d, "in_features": 64, "out_features": 64, "bits_per_weight": bits,
                **({"stages": stages} if stages else {})}

    layers = {f"l{i}": e for i, e in enumerate([entry(256, 8, 2)] * 9 + [entry(256, 16, 2)] * 4
                                               + [entry(256, 16)] * 8 + [entry(64, 2)] * 9)}
    text = allocation_text(layers, {"bits": 1.5})
    assert "9 x k64 d2, 9 x k256 d8 x2, 4 x k256 d16 x2, 8 x k256 d16," in text, text
    assert allocation_text(layers, {"bits": None}) == ""
