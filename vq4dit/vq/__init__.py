"""VQ4DiT core: k-means codebooks, VQLinear (soft candidates / hard indices), ResidualVQLinear (stages that add), bit
packing, model references and artifacts."""
from vq4dit.vq.apply import quantize_linears
from vq4dit.vq.artifact import load_quantized, save_quantized
from vq4dit.vq.kmeans import kmeans
from vq4dit.vq.layer import CodebookSpec, VQLinear
from vq4dit.vq.modelref import build_skeleton, model_class, reference
from vq4dit.vq.packing import pack_bits, unpack_bits
from vq4dit.vq.residual import ResidualVQLinear

__all__ = ["CodebookSpec", "ResidualVQLinear", "VQLinear", "build_skeleton", "kmeans", "load_quantized", "model_class",
           "pack_bits", "quantize_linears", "reference", "save_quantized", "unpack_bits"]
