"""vq4dit in a diffusers user's own script: quantize a pipeline's transformer in memory, or load a quantized
transformer and use it in any pipeline.

    from vq4dit import load_transformer, quantize_transformer
    quantized = quantize_transformer(pipe, wbits=2)  # pipe = FluxPipeline.from_pretrained(...): its teacher
    quantized.save("flux-w2")  # an artifact directory, as quantize.py writes it
    transformer = load_transformer("owner/name" or "path/to/artifact", device="cuda", dtype=torch.bfloat16)
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", transformer=transformer)

The transformer is the pipeline's own diffusers class whose quantized Linears are quantized layers (vq/layer.py,
vq/rtn.py); LoRAs load onto it with diffusers and PEFT (vq/lora.py: a separate full-precision branch, never fused),
accelerate's offload hooks and torch.compile take it as any model. Sequential offload: pass offload_buffers=True to
accelerate.cpu_offload, since a VQ layer's indices (the bulk of its bytes) are a buffer, which accelerate's default
keeps on the execution device.
"""
import importlib

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it from here

# where each public name lives; imported on first use, so that `import jobs.config` (the CLIs' config
# errors, --help) does not import torch
_PUBLIC = {"QuantizedTransformer": "vq4dit.quantize", "quantize_transformer": "vq4dit.quantize",
           "load_transformer": "vq4dit.load", "enable_peft_lora": "vq4dit.vq.lora"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vq4dit' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
