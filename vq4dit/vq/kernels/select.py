"""Which path a quantized layer's inference forward takes: the fused Triton dequantize-matmul or decode + matmul.

The fused kernel (vq/kernels/triton_vq.py) is used only on CUDA, with triton importable, for a layer that has one
(VQLinear), and when the input has at most FUSED_MAX_ROWS rows: there reading the weight dominates, and the fused
kernel reads 1 byte per sub-vector where decode + matmul writes and reads the decoded weight. For more rows the
matmul is compute-bound and cuBLAS on the decoded weight is faster than a Triton tile loop. VQ4DIT_FUSED=0/1
forces the choice (1 still needs CUDA and triton; with TRITON_INTERPRET=1 too, it runs the kernel on CPU tensors
through Triton's interpreter: how the tests run the dispatch without a GPU).
"""
import functools
import importlib.util
import os

FUSED_MAX_ROWS = 1024  # an assumption until measured on a GPU (benchmarks/bench_deploy.py --device cuda)
FUSED_BLOCK_K = 64  # inputs per step of the fused kernel: a sub-vector must fit in one


def fused_supports(dim):
    """Whether the fused kernel handles sub-vectors of `dim` weights: a power of two up to FUSED_BLOCK_K."""
    return dim <= FUSED_BLOCK_K and dim & (dim - 1) == 0


@functools.cache
def triton_available():
    return importlib.util.find_spec("triton") is not None


def fused_setting():
    """VQ4DIT_FUSED: "0" never, "1" always where possible, unset: by the row count."""
    return os.environ.get("VQ4DIT_FUSED", "")


def use_fused(layer, x):
    """Whether `layer` (a QuantLinear) computes x (..., in) with its fused kernel."""
    if not triton_available():  # first: it is cached, and reading the environment costs microseconds per layer
        return False
    if x.device.type != "cuda":  # only the interpreter runs Triton on the CPU, and only when asked to
        if os.environ.get("TRITON_INTERPRET") != "1" or fused_setting() != "1":
            return False
    elif fused_setting() == "0":
        return False
    elif fused_setting() != "1" and x.numel() // x.shape[-1] > FUSED_MAX_ROWS:
        return False
    return layer.has_fused_kernel and layer.is_hard
