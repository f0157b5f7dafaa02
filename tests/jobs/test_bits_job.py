"""--bits through the quantize job: mixed-setting artifacts store and load exactly, a budget that only the uniform
setting meets gives today's artifact, a diffusers pipeline quantizes with it, and the flags refuse bad mixes."""
import hashlib
import math

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import randomize
from vq4dit.cli.quantize import cli
from vq4dit.jobs.config import load_config
from vq4dit.jobs.quantize import quantize
from vq4dit.models.loading import DiTSpec, save_dit
from vq4dit.vq import load_quantized, save_quantized
from vq4dit.vq.packing import index_bits

FAST = {"method": "kmeans", "kmeans_iters": 3, "include": r"^blocks\.[01]\."}  # two blocks: 10 Linears


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_dit(model, "DiT-Digits/2", path)
    return str(path)


def run(ckpt, out, **values):
    probes = {"steps": 3} if "bits" in values else {}  # the teacher runs only for --bits (8 x 4 probe steps)
    if "bits" in values and values.get("method", FAST["method"]) != "kmeans":  # calibration reads its kept steps
        probes["calib_timesteps"] = 2
    config = load_config(overrides={"ckpt": ckpt, **probes, **FAST, **values})
    quantize(config, str(out), progress=False)
    return out


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mixed_settings_store_exactly_and_load_back(tiny_ckpt, tmp_path):
    """Layers at different k and d: each stores ceil(log2 k) bits per sub-vector and a (1, k, d) codebook, the
    average stays within the budget, the card and config.yaml say how the bits were spent, and the loaded model
    saves to the same bytes (exact round trip). Catches a codec reading a layer's k or d from the run's defaults."""
    out = run(tiny_ckpt, tmp_path / "mixed", bits=1.0, bits_settings="16x8,16x4,16x2")
    model, ref, quant = load_quantized(out)
    layers = quant["layers"]
    assert len({(e["k"], e["d"]) for e in layers.values()}) > 1
    weights = {n: e["in_features"] * e["out_features"] for n, e in layers.items()}
    spent = sum(index_bits(e["k"]) / e["d"] * weights[n] for n, e in layers.items())
    assert spent <= 1.0 * sum(weights.values())
    for name, e in layers.items():
        assert e["bits_per_weight"] == index_bits(e["k"]) / e["d"]
        assert quant["tensors"][f"{name}.indices"]["shape"] == [math.ceil(weights[name] // e["d"] * index_bits(e["k"])
                                                                          / 8)]
        assert quant["tensors"][f"{name}.codebook"]["shape"] == [1, e["k"], e["d"]]
        layer = model.get_submodule(name)
        assert (layer.codebook_size, layer.dim) == (e["k"], e["d"])
    assert yaml.safe_load((out / "config.yaml").read_text())["bits"] == 1.0
    assert "Bit allocation (`--bits 1`)" in (out / "README.md").read_text()
    again = tmp_path / "again"
    save_quantized(model, ref, again, yaml.safe_load((out / "config.yaml").read_text()))
    assert sha(again / "model.safetensors") == sha(out / "model.safetensors")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    assert torch.isfinite(model(x, t, y)).all()


def test_a_budget_only_the_uniform_setting_meets_gives_todays_artifact(tiny_ckpt, tmp_path):
    """--bits 1 over {k16 d8, k16 d4}: every layer at k16 d4 (the least error at 1 bit), built by the same k-means
    from the same per-layer seeds as the uniform run --wbits 1 --dim 4, so model.safetensors is byte-identical
    (mutation: the allocation's build seeds layers otherwise -> fails). config.yaml (and so quant_config.json's
    config digest) differ: they record bits."""
    uniform = run(tiny_ckpt, tmp_path / "uniform", wbits=1)
    allocated = run(tiny_ckpt, tmp_path / "allocated", bits=1.0, bits_settings="16x8,16x4")
    assert sha(allocated / "model.safetensors") == sha(uniform / "model.safetensors")
    assert "bits" not in yaml.safe_load((uniform / "config.yaml").read_text())


def test_a_flux_pipeline_quantizes_and_samples_with_mixed_layers(tmp_path):
    """The diffusers path with --bits: probes through the pipeline's teacher, mixed layers in the artifact, sampling
    through the pipeline (k-means only: calibration treats each layer alone, as the tiny DiT runs show; residual
    layers through a pipeline: test_quantize_generic's Qwen-Image case)."""
    pytest.importorskip("transformers")
    from tests.models.tiny_t2i import BUILDERS, PROMPTS
    from tests.models.tiny_t2i import FAST as T2I_FAST
    from vq4dit.jobs.keys_read import ignored_keys
    from vq4dit.jobs.sample import Request, load_for_sampling, sample_to_dir
    from vq4dit.models.adapters.base import SampleSettings

    BUILDERS["flux"]().save_pretrained(str(tmp_path / "pipeline"), safe_serialization=True)
    # what the run refuses beside these settings: the keys it ignores, and a k of its own (--bits sets k per layer)
    unread = {"codebook_size", *ignored_keys(load_config(overrides={"method": "kmeans", "bits": 1.25}))}
    values = {k: v for k, v in T2I_FAST.items() if k not in unread}
    config = load_config(overrides={**values, "ckpt": str(tmp_path / "pipeline"), "method": "kmeans", "bits": 1.25,
                                    "bits_settings": "16x8,16x4,16x2"})
    quantize(config, str(tmp_path / "artifact"), progress=False)
    _, _, quant = load_quantized(tmp_path / "artifact")
    assert len({(e["k"], e["d"]) for e in quant["layers"].values()}) > 1
    images, _ = sample_to_dir(load_for_sampling(quantized=str(tmp_path / "artifact")), tmp_path / "samples",
                              Request(1, prompts=list(PROMPTS)), SampleSettings(steps=2, cfg_scale=2.0, progress=False))
    assert images.shape == (1, 8, 8, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("flags", [["--bits", "1.5", "--wbits", "2"], ["--bits", "1.5", "--dim", "4"],
                                   ["--bits", "0.4"], ["--bits-settings", "256x4"], ["--bits", "2", "--method", "rtn"]])
def test_bad_mixes_are_refused(flags, capsys):
    """--wbits / --dim given with --bits are refused even at their default values (they would be ignored)."""
    with pytest.raises(SystemExit) as e:
        cli([*flags, "--dry-run"])
    assert e.value.code == 2
    assert "bits" in capsys.readouterr().err


def test_dry_run_shows_the_size_at_the_budget(capsys):
    cli(["--bits", "1.5", "--dry-run"])
    out = capsys.readouterr().out
    assert "bits: 1.5" in out and "--bits 1.5: index bits" in out


def test_residual_settings_calibrate_store_exactly_and_sample(tiny_ckpt, tmp_path):
    """--bits 2 --bits-settings 16x4x2 (two residual stages, 2 bits) with VQ4DiT's calibration and output-aware
    start: every layer is a ResidualVQLinear storing 2 x N indices at 4 bits and a (2, 16, 4) codebook, the loaded
    model saves to the same bytes, and sample.py draws from the artifact (mutation: the build drops the setting's
    stages -> one-stage layers, fails)."""
    from vq4dit.cli.sample import cli as sample_cli

    out = run(tiny_ckpt, tmp_path / "residual", bits=2.0, bits_settings="16x4x2", method="vq4dit", iters=2,
              calib_samples=2)
    model, ref, quant = load_quantized(out)
    for name, e in quant["layers"].items():
        n_sub = e["in_features"] * e["out_features"] // 4
        assert (e["class"], e["k"], e["d"], e["stages"], e["bits_per_weight"]) == ("ResidualVQLinear", 16, 4, 2, 2)
        assert quant["tensors"][f"{name}.indices"]["shape"] == [2 * n_sub * 4 // 8]
        assert quant["tensors"][f"{name}.codebook"]["shape"] == [2, 16, 4]
    again = tmp_path / "again"
    save_quantized(model, ref, again, yaml.safe_load((out / "config.yaml").read_text()))
    assert sha(again / "model.safetensors") == sha(out / "model.safetensors")
    sample_cli(["--quantized", str(out), "--num-samples", "2", "--steps", "3", "--out", str(tmp_path / "samples"),
                "-q"])
    with np.load(tmp_path / "samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, 8, 8, 3)
