"""Fast decoding of quantized layers: the gather path for every device (decode.py), a fused Triton
dequantize-matmul for VQ layers on CUDA (triton_vq.py), and which one a forward uses (select.py)."""
