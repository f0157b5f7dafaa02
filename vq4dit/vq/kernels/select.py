"""Which path a quantized layer's inference forward takes: the fused Triton dequantize-matmul or decode + matmul.

The fused kernel (vq/kernels/triton_vq.py) is used only on CUDA, with triton importable, for a layer that has one
(VQLinear), and when the input has at most FUSED_MAX_ROWS rows: there reading the weight dominates, and the fused
kernel reads 1 byte per sub-vector where decode + matmul writes and reads the decoded weight. For more rows the
matmul is compute-bound and cuBLAS on the decoded weight is faster than a Triton tile loop. VQ4DIT_FUSED=0/1
forces the choice (1 still needs CUDA and triton).
"""
import functools
import importlib.util
import os

FUSED_MAX_ROWS = 1024  # an assumption until measured on a GPU (benchmarks/bench_deploy.py --device cuda --fused)


@functools.cache
def triton_available():
    return importlib.util.find_spec("triton") is not None


def fused_setting():
    """VQ4DIT_FUSED: "0" never, "1" always where possible, unset: by the row count."""
    return os.environ.get("VQ4DIT_FUSED", "")


def use_fused(layer, x):
    """Whether `layer` (a QuantLinear) computes x (..., in) with its fused kernel."""
    if x.device.type != "cuda" or not layer.has_fused_kernel or not layer.is_hard or not triton_available():
        return False
    setting = fused_setting()
    return setting == "1" or (setting != "0" and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS)
