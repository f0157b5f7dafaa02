"""A quantized transformer under accelerate's offload hooks and torch.compile, as far as a CPU allows.

Tested here: the hooks of sequential offload (accelerate.cpu_offload, what enable_sequential_cpu_offload attaches)
and of model offload (cpu_offload_with_hook, what enable_model_cpu_offload attaches) go onto the VQ layers, their
tensors leave the module between calls and the outputs are unchanged; every tensor of a VQ layer moves with .to();
no decoded weight stays on a layer after a forward; a LoRA branch is offloaded with its layer; diffusers'
enable_model_cpu_offload(device="cpu") runs a quantized pipeline. Not tested (no GPU here): transfers to a CUDA
execution device; diffusers' enable_sequential_cpu_offload, which here fails for a full-precision pipeline too
(a TypeError in accelerate 1.16's set_module_tensor_to_device offloading the tiny CLIP text encoder's token
embedding, with transformers 5.24 and torch 2.13), so only its hooks on the transformer are tested, through
accelerate.cpu_offload.
Note: sequential offload with accelerate's default offload_buffers=False moves buffers to the execution device once
and keeps them there; a VQ layer's indices are a buffer (the bulk of its bytes), so pass offload_buffers=True to
offload them too (diffusers' enable_sequential_cpu_offload passes False for a transformer).
"""
import os

import pytest
import torch

from tests.api.tiny_lora import tiny_run
from vq4dit import load_transformer
from vq4dit.models.adapters import adapter_for
from vq4dit.vq.layer import VQLinear

VQ_TENSORS = {"codebook", "bias", "indices"}


@pytest.fixture
def model_and_inputs(tmp_path_factory):
    model = load_transformer(tiny_run("sd3", tmp_path_factory).artifact)
    gen = torch.Generator().manual_seed(0)
    shapes = adapter_for(model).example_inputs(model, rows=2, latent_hw=(8, 8), tokens=5)
    return model, {k: torch.randn(v.shape, generator=gen) for k, v in shapes.items()}


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def vq_layers(model):
    return [m for m in model.modules() if isinstance(m, VQLinear)]


def assert_no_decoded_weight(layer):
    """A VQ layer holds its compact tensors only: no other tensor attribute (a cached decoded weight)."""
    named = dict([*layer.named_parameters(), *layer.named_buffers()])
    assert named.keys() == VQ_TENSORS
    assert not [k for k, v in vars(layer).items() if torch.is_tensor(v)]


def test_sequential_offload_hooks_move_every_vq_tensor_and_keep_the_outputs(model_and_inputs):
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model, inputs = model_and_inputs
    want = forward(model, inputs)
    cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=True)
    layers = vq_layers(model)
    assert layers and all(hasattr(m, "_hf_hook") for m in layers)
    assert all(t.is_meta for m in layers for t in [*m.parameters(), *m.buffers()])  # offloaded until called
    assert torch.equal(forward(model, inputs), want)
    assert all(t.is_meta for m in layers for t in [*m.parameters(), *m.buffers()])  # and offloaded again
    for layer in layers:
        assert_no_decoded_weight(layer)
    remove_hook_from_module(model, recurse=True)


def test_sequential_offload_by_default_keeps_the_indices_on_the_execution_device(model_and_inputs):
    """What the docs warn of: accelerate's default offload_buffers=False offloads codebooks and biases (parameters)
    but places buffers, the indices, on the execution device for good."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model, inputs = model_and_inputs
    want = forward(model, inputs)
    cpu_offload(model, execution_device=torch.device("cpu"))
    layers = vq_layers(model)
    assert all(m.codebook.is_meta and not m.indices.is_meta for m in layers)
    assert torch.equal(forward(model, inputs), want)
    remove_hook_from_module(model, recurse=True)


def test_model_offload_hook_keeps_the_outputs(model_and_inputs):
    from accelerate import cpu_offload_with_hook

    model, inputs = model_and_inputs
    want = forward(model, inputs)
    model, hook = cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
    assert torch.equal(forward(model, inputs), want)
    hook.offload()
    hook.remove()


def test_every_vq_tensor_moves_with_to(model_and_inputs):
    model, _ = model_and_inputs
    layers = vq_layers(model)
    model.to(torch.float16)
    assert all(m.codebook.dtype == torch.float16 and m.bias.dtype == torch.float16 and m.indices.dtype == torch.uint8
               for m in layers)
    model.to("meta")
    assert all(t.is_meta for m in layers for t in [*m.parameters(), *m.buffers()])
    for layer in layers:
        assert_no_decoded_weight(layer)


def test_pipeline_model_cpu_offload_runs_a_quantized_pipeline(tmp_path_factory):
    """diffusers' own enable_model_cpu_offload, given device="cpu" (without it, it demands an accelerator): its hook
    goes onto the quantized transformer and the latents stay those of the pipeline without offload, to the same
    tolerance as a full-precision pipeline's (measured max difference 1.9e-6 quantized, 8e-7 full precision: the
    offloaded pipeline's own path, not the VQ layers)."""
    from diffusers import StableDiffusion3Pipeline

    from tests.api.tiny_lora import latents

    run = tiny_run("sd3", tmp_path_factory)
    pipes = [StableDiffusion3Pipeline.from_pretrained(str(run.pipeline), transformer=load_transformer(run.artifact))
             for _ in range(2)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    pipes[1].enable_model_cpu_offload(device="cpu")
    assert hasattr(pipes[1].transformer, "_hf_hook") and vq_layers(pipes[1].transformer)
    torch.testing.assert_close(latents(pipes[1]), latents(pipes[0]), rtol=1e-4, atol=1e-5)


def test_a_lora_branch_is_offloaded_with_its_vq_layer(model_and_inputs):
    """Sequential offload of a LoRA'd quantized transformer: the LoRA matrices leave with the VQ layer's tensors
    between calls and the outputs are unchanged."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module
    from peft import LoraConfig, inject_adapter_in_model

    from vq4dit.vq.lora import QuantLoraLinear

    model, inputs = model_and_inputs
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False), model)
    want = forward(model, inputs)
    cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=True)
    wrapped = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert wrapped and all(t.is_meta for m in wrapped for t in [*m.parameters(), *m.buffers()])
    assert torch.equal(forward(model, inputs), want)
    assert all(t.is_meta for m in wrapped for t in [*m.parameters(), *m.buffers()])
    remove_hook_from_module(model, recurse=True)


@pytest.mark.skipif(os.environ.get("VQ4DIT_COMPILE_TESTS") != "1",
                    reason="torch.compile of the tiny SD3 transformer takes ~90 s on this CPU with a cold inductor "
                           "cache (~20 s warm); set VQ4DIT_COMPILE_TESTS=1 to run it")
def test_compiled_quantized_transformer_gives_the_eager_outputs(model_and_inputs):
    """Tolerance rtol 1e-4, atol 1e-5 (outputs of size ~1; measured max difference 2e-7: inductor fuses and
    reorders float sums)."""
    model, inputs = model_and_inputs
    want = forward(model, inputs)
    compiled = torch.compile(model)
    torch.testing.assert_close(forward(compiled, inputs), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(forward(compiled, inputs), want, rtol=1e-4, atol=1e-5)
