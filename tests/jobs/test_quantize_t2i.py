"""PixArt, SD3 and Flux pipelines go through the quantize job (record, calibrate, save), load and sample.

Tiny random-weight pipelines built in the test (tests/models/tiny_t2i.py), one quantize run per family.
"""

import numpy as np
import pytest

from tests.conftest import hub_bars_switchable
from tests.models.tiny_t2i import (
    PROMPTS,
    assert_calibration_beats_kmeans,
    assert_exact_bits,
    assert_output_aware_holds_or_improves,
    quantized_run,
)
from vq4dit.jobs.config import load_config
from vq4dit.jobs.sample import Request, load_for_sampling, sample_to_dir
from vq4dit.models.adapters.base import SampleSettings
from vq4dit.models.adapters.load import load_model
from vq4dit.utils.yamlfile import read_yaml
from vq4dit.vq import load_quantized

pytest.importorskip("transformers")
FAMILIES = ["pixart", "sd3", "flux"]
CLASSES = {"pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
PIPELINES = {"pixart": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# calibrated / k-means block output error of the worst block of a run, measured with these FAST settings for
# pipeline weight seeds and config seeds 0-3 (the tests use 0): PixArt 0.39-0.67, SD3 0.31-0.51, Flux 0.24-0.34
MARGIN = {"pixart": 0.8, "sd3": 0.7, "flux": 0.5}


@pytest.fixture(params=FAMILIES)
def run(request, tmp_path_factory):
    return request.param, quantized_run(request.param, tmp_path_factory.getbasetemp() / "t2i_runs")


def test_calibration_lowers_every_blocks_error_below_kmeans(run):
    """mse_before is each block's output error with the k-means (nearest codeword) assignment, on the same inputs."""
    family, r = run
    assert_calibration_beats_kmeans(r.stats, {"pixart": 2, "sd3": 2, "flux": 4}[family], MARGIN[family])


def test_output_aware_start_holds_or_improves_every_block(tmp_path_factory):
    """The default start (output-aware, codebook_init auto -> gptvq) through the same adapter code: Flux's four
    blocks end at or below the k-means start's errors. Catches the walk not refitting a diffusers model's layers
    (e.g. moments keyed by the wrong names)."""
    root = tmp_path_factory.getbasetemp() / "t2i_runs"
    kmeans, default = quantized_run("flux", root), quantized_run("flux", root, codebook_init="auto")
    assert default.config.output_aware and not kmeans.config.output_aware
    assert_output_aware_holds_or_improves(kmeans.stats, default.stats)


def test_artifact_loads_as_the_pipelines_transformer_with_exact_bits(run):
    family, r = run
    model, ref, quant = load_quantized(r.artifact)
    assert type(model).__name__ == CLASSES[family]
    assert ref["pipeline"] == {"class": PIPELINES[family], "source": str(r.pipeline.resolve()), "height": 8,
                               "width": 8}
    fp = load_model(None, str(r.pipeline))
    assert sorted(quant["layers"]) == sorted(fp.adapter.linears(fp.model))
    assert_exact_bits(r.artifact, quant, r.config.codebooks.k, r.config.codebooks.dim)
    # config.yaml leaves out the DiT name a pipeline does not use (it said model: DiT-Digits/2); read back, the
    # same config (mutation: to_yaml writing to_dict as it is)
    saved = r.artifact / "config.yaml"
    assert "model" not in read_yaml(saved) and load_config(str(saved)).to_dict() == r.config.to_dict()


def test_sampling_through_the_pipeline_is_seeded_per_sample(run, tmp_path):
    """The same seed draws the same images whatever the batch size; labels are the prompt indices."""
    family, r = run
    loaded, request = load_for_sampling(quantized=r.artifact), Request(4, prompts=list(PROMPTS))
    outs = []
    for batch in (3, 2):
        settings = SampleSettings(seed=5, steps=2, cfg_scale=2.0, batch_size=batch, progress=False)
        images, labels = sample_to_dir(loaded, tmp_path / f"b{batch}", request, settings)
        outs.append(images)
        assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
        assert labels.tolist() == [0, 1, 2, 0]
        assert (tmp_path / f"b{batch}" / "grid.png").stat().st_size > 0
    np.testing.assert_array_equal(outs[0], outs[1])
    other, _ = sample_to_dir(loaded, tmp_path / "seed6", Request(1, prompts=list(PROMPTS)),
                             SampleSettings(seed=6, steps=2, cfg_scale=2.0, progress=False))
    assert not np.array_equal(other[0], outs[0][0])



def test_sampling_in_bf16_casts_the_whole_pipeline(tmp_path_factory, tmp_path):
    """sample.py --precision bf16: the text encoders and the VAE run in bf16 with the transformer (a bf16
    transformer fed fp32 prompt embeddings fails), and the images stay close to fp32 ones."""
    r = quantized_run("pixart", tmp_path_factory.getbasetemp() / "t2i_runs")
    settings = SampleSettings(seed=1, steps=2, cfg_scale=2.0, progress=False)
    images = {}
    for precision in ("fp32", "bf16"):
        loaded = load_for_sampling(quantized=r.artifact, precision=precision)
        images[precision], _ = sample_to_dir(loaded, tmp_path / precision, Request(2, prompts=list(PROMPTS)), settings)
    difference = np.abs(images["bf16"].astype(int) - images["fp32"].astype(int)).mean()
    assert 0 < difference < 8, difference  # measured 0.36 of 255


def test_a_full_precision_reference_is_drawn_at_the_artifacts_size(tmp_path, tmp_path_factory):
    """The artifact samples at the size it was calibrated at (8 x 8 here); the full-precision pipeline drew its own
    default (128 x 128 for the tiny Flux), so the two never paired. --height/--width (SampleSettings) set the size
    of either (mutation: the settings' size not passed to the pipeline -> 128 x 128)."""
    from vq4dit.jobs.sample import FPSource

    r = quantized_run("flux", tmp_path_factory.getbasetemp() / "t2i_runs")
    settings = SampleSettings(seed=5, steps=2, cfg_scale=2.0, progress=False, height=16, width=8)
    fp, _ = sample_to_dir(load_for_sampling(source=FPSource(ckpt=str(r.pipeline))), tmp_path / "fp",
                          Request(2, prompts=list(PROMPTS)), settings)
    quantized, _ = sample_to_dir(load_for_sampling(quantized=r.artifact), tmp_path / "q",
                                 Request(2, prompts=list(PROMPTS)), settings)
    assert fp.shape == quantized.shape == (2, 16, 8, 3)


@hub_bars_switchable
def test_sample_quiet_silences_the_libraries_loading_bars(tmp_path_factory, tmp_path):
    """sample.py -q (here of the full-precision pipeline) showed diffusers' "Loading pipeline components" bar (a new
    user's trial); now -q turns the Hugging
    Face libraries' bars off for the run (utils.cli.quiet_libraries, models.pipelines.loading_bars) and restores
    them after (that the libraries' bars show otherwise: test_t2i_adapters.py's loading_bars test). Mutations:
    loading_bars not following the hub's switch (the bar under -q); the switch not restored (hub bars still off
    after the run)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    from tests.cli_helpers import run_here

    r = quantized_run("flux", tmp_path_factory.getbasetemp() / "t2i_runs")
    proc = run_here("sample.py", "--ckpt", r.pipeline, "--prompt", "a cat", "--height", "8", "--width", "8",
                    "--num-samples", "1", "--steps", "1", "--device", "cpu", "--out", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "Loading pipeline components" not in proc.stderr and "%|" not in proc.stderr, proc.stderr[-500:]
    assert not are_progress_bars_disabled()
