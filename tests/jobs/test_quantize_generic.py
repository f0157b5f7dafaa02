"""Families without a dedicated adapter go through the generic one: quantize (record, calibrate, save), load, sample.

Tiny random-weight pipelines built in the test (tests/models/tiny_generic.py), one quantize run per family: SANA,
Qwen-Image, Chroma, Z-Image (images), Wan and CogVideoX (videos).
"""

import numpy as np
import pytest

import vq4dit.jobs.sample
from tests.models.tiny_generic import FAMILIES, SIZES, generic_run
from tests.models.tiny_t2i import (
    PROMPTS,
    assert_calibration_beats_kmeans,
    assert_exact_bits,
    assert_output_aware_holds_or_improves,
)
from vq4dit.jobs.sample import Request, Resume, load_for_sampling, sample_to_dir
from vq4dit.models.adapters.base import SampleSettings
from vq4dit.models.adapters.load import load_model
from vq4dit.vq import load_quantized

pytest.importorskip("transformers")
BLOCKS = {"sana": 2, "qwenimage": 2, "chroma": 4, "zimage": 4, "wan": 2, "cogvideox": 2}
# calibrated / k-means block output error of the worst block of a run, measured with tiny_t2i's FAST settings for
# pipeline weight seeds and config seeds 0-3 (the tests use 0): SANA 0.34-0.54, Qwen-Image 0.11-0.22, Chroma
# 0.17-0.22, Z-Image 0.33-0.44, Wan 0.42-0.58, CogVideoX 0.26-0.43; each margin sits above the worst of its four
MARGIN = {"sana": 0.7, "qwenimage": 0.4, "chroma": 0.4, "zimage": 0.6, "wan": 0.75, "cogvideox": 0.6}


@pytest.fixture(params=FAMILIES)
def run(request, tmp_path_factory):
    return request.param, generic_run(request.param, tmp_path_factory.getbasetemp() / "generic_runs")


def test_calibration_lowers_every_blocks_error_below_kmeans(run):
    """mse_before is each block's output error with the k-means (nearest codeword) assignment, on the same inputs."""
    family, r = run
    assert_calibration_beats_kmeans(r.stats, BLOCKS[family], MARGIN[family])


def test_output_aware_start_holds_or_improves_every_block(tmp_path_factory):
    """The default (output-aware) start through the generic adapter (Qwen-Image: its blocks take two streams)
    ends every block at or below the k-means start's error."""
    root = tmp_path_factory.getbasetemp() / "generic_runs"
    kmeans, default = generic_run("qwenimage", root), generic_run("qwenimage", root, codebook_init="auto")
    assert default.config.output_aware
    assert_output_aware_holds_or_improves(kmeans.stats, default.stats)


def test_artifact_loads_as_the_pipelines_transformer_with_exact_bits(run):
    family, r = run
    model, ref, quant = load_quantized(r.artifact)
    fp = load_model(None, str(r.pipeline))
    assert type(model) is type(fp.model) and fp.adapter.family == "generic"
    assert ref["pipeline"] == {"class": ref["pipeline"]["class"], "source": str(r.pipeline.resolve()), **SIZES[family]}
    assert sorted(quant["layers"]) == sorted(fp.adapter.linears(fp.model))
    assert_exact_bits(r.artifact, quant, r.config.codebooks.k, r.config.codebooks.dim)


def test_sampling_through_the_pipeline_is_seeded_per_sample(run, tmp_path, monkeypatch):
    """The same seed draws the same images (videos: frames) whatever the batch size, up to a rounding step of one
    pixel value (CogVideoX's 3-D VAE sums in a batch-dependent order); labels are prompt indices. A video run's
    free-space check counts what it writes (mutation: its size (F, H, W) read as an image's (H, W) -> below)."""
    family, r = run
    loaded = load_for_sampling(quantized=r.artifact)
    outs = []
    for batch in (3, 2):
        settings = SampleSettings(seed=5, steps=2, cfg_scale=2.0, batch_size=batch, progress=False)
        resume = Resume({"family": family}) if batch == 2 else None  # the batches kept, then removed
        images, labels = sample_to_dir(loaded, tmp_path / f"b{batch}", Request(3, prompts=list(PROMPTS)), settings,
                                       resume=resume)
        outs.append(images)
        assert images.dtype == np.uint8 and images.shape[0] == 3 and images.shape[-1] == 3
        assert labels.tolist() == [0, 1, 2]
        assert (tmp_path / f"b{batch}" / "grid.png").stat().st_size > 0
        assert not (tmp_path / f"b{batch}" / "sample_state").exists()
    assert np.abs(outs[0].astype(int) - outs[1].astype(int)).max() <= 1
    assert not np.array_equal(outs[0][0], outs[0][1])  # another prompt and noise
    if "num_frames" in SIZES[family]:
        assert images.ndim == 5
        frames = sorted((tmp_path / "b2" / "videos" / "00002").glob("*.png"))
        assert len(frames) == images.shape[1] >= 2
        longer = SampleSettings(seed=5, steps=2, cfg_scale=2.0, num_frames=SIZES[family]["num_frames"] + 4,
                                progress=False)  # sample.py --num-frames over the calibrated frames
        needed = []
        monkeypatch.setattr(vq4dit.jobs.sample, "check_free_space", lambda path, size, what: needed.append(size))
        videos, _ = sample_to_dir(loaded, tmp_path / "longer", Request(1, prompts=list(PROMPTS)), longer)
        assert videos.shape[1] > images.shape[1]
        written = sum(p.stat().st_size for p in (tmp_path / "longer").rglob("*") if p.is_file() and p.suffix != ".mp4")
        assert written <= needed[0] <= 2 * written
    else:
        assert images.shape[1:3] == (SIZES[family]["height"], SIZES[family]["width"])


def test_a_quiet_dry_run_of_a_generic_pipeline_shows_no_loading_bar(tmp_path_factory):
    """-q silences diffusers' "Loading pipeline components" bar; the generic adapter's plan builds the pipeline on
    meta (pipeline_runs.meta_pipeline), where the review of the change found it still shown (mutation: that load
    outside models.pipelines.loading_bars)."""
    from tests.cli_helpers import run_here

    r = generic_run("sana", tmp_path_factory.getbasetemp() / "generic_runs")
    proc = run_here("quantize.py", "--config", r.artifact / "config.yaml", "--dry-run", "-q")  # the run's settings
    assert proc.returncode == 0 and "memory plan" in proc.stdout, proc.stderr[-500:]
    assert "Loading pipeline components" not in proc.stderr and "%|" not in proc.stderr, proc.stderr[-500:]


@pytest.mark.parametrize("family", ["sana", "chroma", "wan", "cogvideox"])  # prompts padded to a fixed length
def test_dry_run_plan_predicts_the_recorded_slots(family, tmp_path_factory):
    """The plan runs the pipeline on the meta device (no weights) up to its first transformer call; its slots are
    those the real run recorded, shape for shape and byte for byte, and its title counts the blocks called."""
    from vq4dit.jobs.memory_plan import Planned, dry_run_plan, memory_plan, meta_model, plan_source
    from vq4dit.models.adapters.generic import GenericAdapter

    r = generic_run(family, tmp_path_factory.getbasetemp() / "generic_runs")
    name, config, factor, directory = plan_source(str(r.pipeline))
    adapter = GenericAdapter()
    adapter.bind({"pipeline": {"source": str(directory)}}, **SIZES[family])
    plan = memory_plan(Planned(meta_model(name, config), adapter, factor), r.config)
    recorded = r.calibration_set.slots
    assert [(key, tuple(shape)) for key, shape, _ in plan.slots] == [(k, tuple(t.shape)) for k, t in recorded.items()]
    assert plan.cache_bytes == sum(t.numel() * t.element_size() for t in recorded.values())
    assert dry_run_plan(r.config).startswith(f"memory plan: {name} ({BLOCKS[family]} blocks)")


def test_residual_layers_calibrate_and_load_through_the_generic_adapter(tmp_path_factory):
    """Qwen-Image with two residual stages per Linear (--bits 2 --bits-settings 16x4x2) and the output-aware start:
    calibration walks every block, every layer is stored as a ResidualVQLinear and the artifact loads as the
    pipeline's transformer, giving finite outputs in a sampled image (mutation: the generic build drops the
    setting's stages -> one-stage layers, fails)."""
    root = tmp_path_factory.getbasetemp() / "generic_runs"
    r = generic_run("qwenimage", root, codebook_size=None, bits=2.0, bits_settings="16x4x2", codebook_init="auto")
    assert len(r.stats) == BLOCKS["qwenimage"] and all(np.isfinite(s["mse_after"]) for s in r.stats)
    _, _, quant = load_quantized(r.artifact)
    assert {(e["class"], e["stages"], e["bits_per_weight"]) for e in quant["layers"].values()} == \
        {("ResidualVQLinear", 2, 2.0)}
    images, _ = sample_to_dir(load_for_sampling(quantized=str(r.artifact)), tmp_path_factory.mktemp("samples"),
                              Request(1, prompts=list(PROMPTS)), SampleSettings(steps=2, cfg_scale=2.0, progress=False))
    assert images.shape[0] == 1 and images.dtype == np.uint8
