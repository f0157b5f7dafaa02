"""vq4dit in a diffusers user's own script: load a quantized transformer and use it in any pipeline.

    from vq4dit import load_transformer
    transformer = load_transformer("owner/name" or "path/to/artifact", device="cuda", dtype=torch.bfloat16)
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", transformer=transformer)

The transformer is the pipeline's own diffusers class whose quantized Linears are VQ layers (vq/layer.py); LoRAs
load onto it with diffusers and PEFT (vq/lora.py: a separate full-precision branch, never fused), accelerate's
offload hooks and torch.compile take it as any model. Sequential offload: pass offload_buffers=True to
accelerate.cpu_offload, since a VQ layer's indices (the bulk of its bytes) are a buffer, which accelerate's default
keeps on the execution device. `quantize_transformer(pipe, ...)`, quantizing a pipeline's
transformer in memory with the pipeline as its teacher, belongs in this package too (vq4dit/quantize.py).
"""
from vq.lora import enable_peft_lora
from vq4dit.load import load_transformer

__all__ = ["enable_peft_lora", "load_transformer"]
