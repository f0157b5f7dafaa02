"""VQ4DiT core: k-means codebooks, VQLinear (soft candidates / hard indices), bit packing and artifacts."""
from vq.apply import quantize_linears
from vq.artifact import load_quantized, save_quantized
from vq.kmeans import kmeans
from vq.layer import VQLinear
from vq.packing import pack_bits, unpack_bits

__all__ = ["VQLinear", "kmeans", "load_quantized", "pack_bits", "quantize_linears", "save_quantized", "unpack_bits"]
