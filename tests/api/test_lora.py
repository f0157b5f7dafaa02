"""LoRA on a quantized transformer (vq/lora.py): diffusers' load_lora_weights on Flux and SD3 tiny pipelines, PEFT's
adapter injection on PixArt. The LoRA is a separate full-precision branch: the output equals the quantized base's
plus the branch written out by hand (HandLora), set_adapters scales it, weight 0 and unloading give the base back
exactly, fusing is refused. LoRAs are made in the tests on the full-precision transformer (tests/api/tiny_lora.py)."""
import diffusers
import pytest
import torch

from tests.api import tiny_lora
from tests.api.tiny_lora import ALPHA, RANK, add_hand_lora, latents, make_lora, tiny_run
from vq4dit import load_transformer
from vq4dit.utils.errors import UserError
from vq4dit.vq.layer import VQLinear
from vq4dit.vq.lora import QuantLoraLinear

pytest.importorskip("peft")
PIPELINES = {"flux": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
             "pixart": diffusers.PixArtSigmaPipeline}


@pytest.fixture(params=["flux", "sd3"])
def lora_case(request, tmp_path_factory, tmp_path):
    """(family, its quantize run, the quantized pipeline, the directory of two LoRAs saved in diffusers' format,
    their state dicts {seed: state dict})."""
    family = request.param
    run = tiny_run(family, tmp_path_factory)
    loras = {seed: save_lora(family, run, tmp_path / "lora", seed) for seed in (0, 1)}
    return family, run, quantized_pipeline(family, run), tmp_path / "lora", loras


def save_lora(family, run, directory, seed=0):
    return tiny_lora.save_lora(PIPELINES[family], run.pipeline, directory, seed)


def quantized_pipeline(family, run):
    pipe = PIPELINES[family].from_pretrained(run.pipeline, transformer=load_transformer(run.artifact))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_quantized_plus_lora_is_the_quantized_base_plus_the_branch_by_hand(lora_case):
    """Two LoRAs at adapter weights 0.7 and 0.3: every targeted layer computes VQ(x) + 0.7 * alpha/r * x A1^T B1^T
    + 0.3 * alpha/r * x A2^T B2^T (the final proj_out, full precision, gets PEFT's plain LoRA layer); the pipeline's
    latents equal those of the hand-written model."""
    family, run, pipe, lora_dir, loras = lora_case
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    pipe.load_lora_weights(lora_dir, weight_name="lora_1.safetensors", adapter_name="other")
    pipe.set_adapters(["style", "other"], [0.7, 0.3])
    wrapped = [m for m in pipe.transformer.modules() if isinstance(m, QuantLoraLinear)]
    assert wrapped and all(isinstance(m.base_layer, VQLinear) for m in wrapped)
    reference = quantized_pipeline(family, run)
    assert add_hand_lora(reference.transformer, loras[0], 0.7 * ALPHA / RANK) == len(loras[0]) // 2
    add_hand_lora(reference.transformer, loras[1], 0.3 * ALPHA / RANK)
    got, want, base = latents(pipe), latents(reference), latents(quantized_pipeline(family, run))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 100 * 1e-5  # the branch is there, far beyond the tolerance


def test_quantized_lora_is_as_close_to_fp_lora_as_quantized_is_to_fp(lora_case):
    family, run, pipe, lora_dir, _ = lora_case
    fp = PIPELINES[family].from_pretrained(run.pipeline)
    fp.set_progress_bar_config(disable=True)
    q, f = latents(pipe), latents(fp)
    pipe.load_lora_weights(lora_dir)
    fp.load_lora_weights(lora_dir)
    q_lora, f_lora = latents(pipe), latents(fp)
    ratio = (q_lora - f_lora).norm() / (q - f).norm()
    assert 0.67 < ratio < 1.5, ratio  # measured 0.90 (Flux), 1.22 (SD3)
    assert (f_lora - f).norm() > 0.3 * (q - f).norm()  # the LoRA matters: measured 0.76x (Flux), 10x (SD3)


def test_adapter_weight_zero_and_unloading_give_the_base_back_exactly(lora_case):
    family, run, pipe, lora_dir, _ = lora_case
    base = latents(pipe)
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    assert not torch.equal(latents(pipe), base)
    pipe.set_adapters(["style"], [0.0])
    assert torch.equal(latents(pipe), base)
    pipe.set_adapters(["style"], [1.0])
    pipe.unload_lora_weights()
    assert not any(isinstance(m, QuantLoraLinear) for m in pipe.transformer.modules())
    assert torch.equal(latents(pipe), base)


def test_fusing_into_a_vq_layer_is_refused_and_changes_nothing(lora_case):
    family, run, pipe, lora_dir, _ = lora_case
    pipe.load_lora_weights(lora_dir)
    before = latents(pipe)
    with pytest.raises(UserError, match="cannot fuse a LoRA into a quantized layer") as e:
        pipe.fuse_lora()
    assert "\n" not in str(e.value)
    assert torch.equal(latents(pipe), before)


def test_dora_on_a_quantized_layer_is_refused_saying_why(tmp_path_factory):
    """DoRA on a quantized transformer was PEFT's bare "Invalid or unsupported variant combination: ('use_dora',)"
    (a new user's trial); now it says that DoRA reads the base weight, which the quantized layer stores encoded
    (mutation: PEFT's ValueError passed through)."""
    from peft import LoraConfig

    model = load_transformer(tiny_run("flux", tmp_path_factory).artifact)
    with pytest.raises(UserError, match=r"\('use_dora',\): LoRA variants \(DoRA, \.\.\.\) read the base layer's weight "
                                        r"as a tensor, and this VQLinear \(.*\) stores it encoded; use plain LoRA"):
        model.add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))


def test_pixart_takes_a_lora_through_peft_adapter_injection(tmp_path_factory):
    """PixArt pipelines have no LoRA loader (nor its transformer add_adapter): PEFT's inject_adapter_in_model with a
    LoraConfig, the matrices set by set_peft_model_state_dict; equal to the hand-written model, and deleting the
    adapter gives the base back exactly."""
    from peft import LoraConfig
    from peft.functional import delete_adapter, inject_adapter_in_model, set_peft_model_state_dict

    run = tiny_run("pixart", tmp_path_factory)
    lora, config = make_lora(PIPELINES["pixart"].from_pretrained(run.pipeline).transformer)
    pipe, reference = quantized_pipeline("pixart", run), quantized_pipeline("pixart", run)
    base = latents(pipe)
    inject_adapter_in_model(LoraConfig(**config), pipe.transformer, adapter_name="p")
    set_peft_model_state_dict(pipe.transformer, lora, adapter_name="p")
    assert any(isinstance(m, QuantLoraLinear) for m in pipe.transformer.modules())
    add_hand_lora(reference.transformer, lora, ALPHA / RANK)
    torch.testing.assert_close(latents(pipe), latents(reference), rtol=1e-4, atol=1e-5)
    delete_adapter(pipe.transformer, "p", prefix="lora_")
    assert torch.equal(latents(pipe), base)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_lora_on_an_rtn_quantized_transformer_is_its_base_plus_the_branch_by_hand(family, tmp_path_factory,
                                                                                   tmp_path):
    """Round-to-nearest layers take a LoRA as VQ layers do (mutations: RTNLinear without qweight, the custom-module
    mapping listing VQLinear only, Flux's loader reading an RTN layer's weight shape: each makes load_lora_weights
    fail). Unloading gives the RTN base back exactly."""
    from vq4dit import quantize_transformer
    from vq4dit.vq.rtn import RTNLinear

    run = tiny_run(family, tmp_path_factory)
    lora = save_lora(family, run, tmp_path / "lora")
    pipe, reference = (PIPELINES[family].from_pretrained(str(run.pipeline)) for _ in range(2))
    for p in (pipe, reference):
        quantize_transformer(p, method="rtn", wbits=4, device="cpu", progress=False)
        p.set_progress_bar_config(disable=True)
    base = latents(pipe)
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="style")
    pipe.set_adapters(["style"], [0.5])
    wrapped = [m for m in pipe.transformer.modules() if isinstance(m, QuantLoraLinear)]
    assert wrapped and all(isinstance(m.base_layer, RTNLinear) for m in wrapped)
    add_hand_lora(reference.transformer, lora, 0.5 * ALPHA / RANK)
    got = latents(pipe)
    torch.testing.assert_close(got, latents(reference), rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 100 * 1e-5
    pipe.unload_lora_weights()
    assert torch.equal(latents(pipe), base)
