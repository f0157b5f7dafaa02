"""LoRAs made in the tests: seeded random low-rank matrices on a full-precision tiny transformer, in diffusers' format;
and a hand-written reference of a LoRA'd layer to compare PEFT's against."""
import torch
from torch import nn

from tests.models.tiny_t2i import quantized_run

# every block's attention projections (quantized) and the final proj_out (full precision in every family; in Flux
# the single blocks' proj_out, quantized, matches too)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
RANK, ALPHA = 2, 4  # PEFT's scaling: ALPHA / RANK = 2
STD = 0.1  # of A and B: the LoRA changes the pipeline's output about as much as quantizing does (measured)
LATENT_CALL = {"prompt": "a cat", "num_inference_steps": 2, "height": 8, "width": 8, "output_type": "latent"}


def tiny_run(family, tmp_path_factory):
    """The session's quantize run of the tiny `family` pipeline (shared with tests/jobs/test_quantize_t2i.py)."""
    return quantized_run(family, tmp_path_factory.getbasetemp() / "t2i_runs")


def make_lora(transformer, seed=0, targets=TARGETS):
    """Inject adapter "default" with seeded random A and B into a full-precision `transformer` (PEFT's
    inject_adapter_in_model: PixArt's transformer has no add_adapter); returns (its state dict
    {"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}, its LoraConfig as a dict)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, transformer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * STD)
    return {k: v.clone() for k, v in get_peft_model_state_dict(transformer).items()}, config.to_dict()


def save_lora(pipeline_class, pipeline_dir, directory, seed=0):
    """A LoRA made (make_lora) on the full-precision transformer of the `pipeline_class` pipeline at `pipeline_dir`,
    saved to `directory` in diffusers' format (the file pytorch_lora_weights.safetensors, or lora_<seed>.safetensors
    for seed > 0; alpha in its metadata); returns its state dict."""
    lora, config = make_lora(pipeline_class.from_pretrained(str(pipeline_dir)).transformer, seed)
    pipeline_class.save_lora_weights(directory, transformer_lora_layers=lora, transformer_lora_adapter_metadata=config,
                                     weight_name=f"lora_{seed}.safetensors" if seed else None)
    return lora


class HandLora(nn.Module):
    """base(x) + scale * (x A^T) B^T: a LoRA'd layer written out, the reference for PEFT's."""

    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


def add_hand_lora(transformer, lora, scale):
    """Replace every layer `lora` targets by a HandLora of it; returns the number replaced."""
    from vq4dit.vq.apply import set_submodule

    names = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    for name in names:
        base = transformer.get_submodule(name)
        set_submodule(transformer, name, HandLora(base, lora[f"{name}.lora_A.weight"],
                                                  lora[f"{name}.lora_B.weight"], scale))
    return len(names)


def latents(pipe, seed=0):
    """The pipeline's final latents for LATENT_CALL, noise from `seed`."""
    from vq4dit.models.adapters import adapter_for

    options = adapter_for(pipe.transformer).call_options  # PixArt: no resolution binning at 8 x 8
    with torch.no_grad():
        return pipe(**LATENT_CALL, **options, generator=torch.Generator().manual_seed(seed)).images
