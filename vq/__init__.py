"""VQ4DiT core: k-means codebooks, VQLinear (soft candidates / hard indices), bit packing, model references and
artifacts."""
from vq.apply import quantize_linears
from vq.artifact import load_quantized, save_quantized
from vq.kmeans import kmeans
from vq.layer import CodebookSpec, VQLinear
from vq.modelref import build_skeleton, model_class, reference
from vq.packing import pack_bits, unpack_bits

__all__ = ["CodebookSpec", "VQLinear", "build_skeleton", "kmeans", "load_quantized", "model_class", "pack_bits",
           "quantize_linears", "reference", "save_quantized", "unpack_bits"]
