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
from vq.lora import enable_peft_lora
from vq4dit.load import load_transformer
from vq4dit.quantize import QuantizedTransformer, quantize_transformer

__all__ = ["QuantizedTransformer", "enable_peft_lora", "load_transformer", "quantize_transformer"]
