"""VQ4DiT core: k-means codebooks, VQLinear (soft candidates / hard indices), bit packing and artifacts."""
from vq.apply import quantize_linears
from vq.kmeans import kmeans
from vq.layer import VQLinear
from vq.packing import pack_bits, unpack_bits

__all__ = ["VQLinear", "kmeans", "pack_bits", "quantize_linears", "unpack_bits"]
