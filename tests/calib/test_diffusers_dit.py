"""The embedded digits DiT exported to diffusers form and quantized natively (its own layer names, to_q / to_k /
to_v as three layers) lands where the project's DiT path lands (with q, k, v as three codebooks too)."""
import copy

import pytest

from tests.calib.conftest import run_calibration
from tests.models.test_diffusers_format import diffusers_model
from vq4dit.calib.capture import capture_model_inputs, step_filter
from vq4dit.calib.metrics import prediction_mse
from vq4dit.calib.teacher import teacher_plan
from vq4dit.jobs.config import QuantizeConfig
from vq4dit.models.adapters import adapter_for
from vq4dit.models.loading import load_dit
from vq4dit.vq import CodebookSpec, quantize_linears

pytest.importorskip("diffusers")
# the paper's k-means start (the test's layers are quantized soft, as the walk's output-aware refit does not take
# them) and 10 iterations per block: the comparison is between two forms of one model, not of the recipe
SETTINGS = dict(codebook_size=64, dim=4, kmeans_iters=10, iters=10, calib_samples=4, calib_timesteps=3, steps=10,
                codebook_init="kmeans", device="cpu")


def noise_mse_after(teacher, split_qkv, method, tmp_path):
    """Noise MSE vs the FP teacher on held-out teacher inputs (another seed) after quantizing with `method`."""
    adapter = adapter_for(teacher)
    config = QuantizeConfig.from_flat(dict(split_qkv=split_qkv, method=method, **SETTINGS)).validate()
    student = copy.deepcopy(teacher)
    c = config.codebooks
    spec = CodebookSpec(c.k, c.dim, candidates=2 if method == "vq4dit" else 1, kmeans_iters=c.kmeans_iters)
    qlayers = quantize_linears(student, spec, include=adapter.quant_include(student), split_qkv=split_qkv,
                               seed=config.seed, progress=False)
    if method == "kmeans":
        for layer in qlayers.values():
            layer.harden()
    else:
        run_calibration(student, teacher, adapter, qlayers, config, str(tmp_path))
    held_out = QuantizeConfig.from_flat({**SETTINGS, "calib_samples": 8, "seed": 1000})
    plan = teacher_plan(held_out.teacher, held_out.seed)
    calls = capture_model_inputs(teacher, adapter.teacher_runs(teacher, plan, "cpu"),
                                 step_filter(plan.steps, held_out.teacher.calib_timesteps), progress=False)
    return prediction_mse(student, teacher, adapter, calls, "cpu")


def test_native_diffusers_calibration_lands_where_the_projects_dit_path_lands(tmp_path):
    native, _ = load_dit(None, None)
    exported = diffusers_model(native)
    ours = noise_mse_after(native, True, "vq4dit", tmp_path / "ours")
    theirs = noise_mse_after(exported, False, "vq4dit", tmp_path / "theirs")
    kmeans_only = noise_mse_after(exported, False, "kmeans", tmp_path / "kmeans")
    # measured at 10 iterations per block: 0.255 (project DiT) vs 0.231 (diffusers form), k-means only 0.83
    assert 2 / 3 < theirs / ours < 3 / 2
    assert theirs < 0.4 * kmeans_only
