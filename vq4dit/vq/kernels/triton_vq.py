"""A fused VQ-dequantize + matrix multiply in Triton: y = x W^T + b with W never written to memory.

Each program computes a (BLOCK_M, BLOCK_N) tile of y. Per step along the input dimension it reads the tile's
indices once, (BLOCK_N, BLOCK_K / d) of them in their stored dtype (uint8 up to k = 256), expands each to its d
codeword values and multiplies the (BLOCK_N, BLOCK_K) weight tile with x's (BLOCK_M, BLOCK_K) tile, accumulating in
float32. The codewords come from the layer's codebooks, (G, k, d) with row group g = n // (N / G), held in one of two
ways (TABLE): "gather" loads every codebook of the layer into the program once (on a GPU, tl.gather of a block sits
in shared memory) and gathers from it; "load" reads each codeword from global memory through the cache, for
codebooks too large for that (more than MAX_GATHER_TABLE values).

Requirements (select.fused_supports): d a power of two up to BLOCK_K; any in / out sizes (masked tiles).
Float32 inputs use IEEE float32 products unless torch allows TF32 for matmuls (torch.backends.cuda.matmul), as
cuBLAS does. The tests run this kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vq4dit.vq.kernels.select import FUSED_BLOCK_K, fused_supports

MAX_GATHER_TABLE = 8192  # codebook values (G * k * d) held per program in "gather" mode: 32 KiB in float32
BLOCK_N, BLOCK_K = 64, FUSED_BLOCK_K


@triton.jit
def _vq_matmul_kernel(x_ptr, idx_ptr, cb_ptr, bias_ptr, y_ptr, M, N, K, rows_per_group, table_values, stride_xm,
                      stride_ym,
                      K_CODES: tl.constexpr, D: tl.constexpr, TABLE_SIZE: tl.constexpr, TABLE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_s = tl.arange(0, BLOCK_K // D)  # (BK/d,) sub-vectors of a K step
    offs_d = tl.arange(0, D)  # (d,)
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)
    mask_m, mask_n = offs_m < M, offs_n < N
    subs_per_row = K // D
    group_base = (offs_n // rows_per_group) * (K_CODES * D)  # (BN,) start of each row's codebook
    if TABLE == "gather":
        table_offs = tl.arange(0, TABLE_SIZE)
        table = tl.load(cb_ptr + table_offs, mask=table_offs < table_values, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        sub = k0 // D + offs_s  # (BK/d,)
        idx_mask = mask_n[:, None] & (sub[None, :] < subs_per_row)
        idx = tl.load(idx_ptr + offs_n[:, None] * subs_per_row + sub[None, :], mask=idx_mask, other=0)
        code = tl.where(idx_mask, group_base[:, None] + idx.to(tl.int32) * D, 0)  # (BN, BK/d) codeword offsets
        offs = tl.reshape(code[:, :, None] + offs_d[None, None, :], (BLOCK_N, BLOCK_K))  # (BN, BK)
        if TABLE == "gather":
            w = tl.reshape(tl.gather(table, tl.reshape(offs, (BLOCK_N * BLOCK_K,)), 0), (BLOCK_N, BLOCK_K))
        else:
            w = tl.load(cb_ptr + offs)
        kk = k0 + offs_k
        w = tl.where(mask_n[:, None] & (kk[None, :] < K), w, 0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K),
                    other=0.0)
        w = w.to(x.dtype)
        if DOT_FP32:  # products of two bf16 values are exact in float32: the same sums as a bf16 dot
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _block_m(rows):
    return min(64, max(16, triton.next_power_of_2(rows)))


class KernelConfig(NamedTuple):
    """What one launch compiles: the kernel's constexpr arguments and Triton's launch options."""

    constants: dict
    num_warps: int
    num_stages: int


def kernel_config(dtype, codebook_shape, rows, has_bias, table=None):
    """The KernelConfig of a launch on `rows` inputs of `dtype` with codebooks of `codebook_shape` (G, k, d).

    table: "gather" | "load" (default: "gather" when the codebooks hold at most MAX_GATHER_TABLE values).
    Launch options, chosen by what ptxas makes of them (tests/vq/test_triton_vq_compiled.py compiles them for sm_90
    and sm_89 here, without a GPU): with Triton's default 4 warps a 64-row tile needs more than 255 registers per thread
    and spills to local memory, and software pipelining (num_stages > 1) of the "load" table's codeword loads
    spills kilobytes per thread in float32; 8 warps, and one stage for "load", compile without spills.
    """
    g, k, d = codebook_shape
    table = table or ("gather" if g * k * d <= MAX_GATHER_TABLE else "load")
    precision = "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    # Triton 3.9's interpreter returns garbage for tl.dot of bfloat16 operands: it gets float32 copies of them
    dot_fp32 = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    if dot_fp32:
        precision = "ieee"
    constants = dict(K_CODES=k, D=d, TABLE_SIZE=triton.next_power_of_2(g * k * d), TABLE=table, HAS_BIAS=has_bias,
                     PRECISION=precision, DOT_FP32=dot_fp32, BLOCK_M=_block_m(rows), BLOCK_N=BLOCK_N,
                     BLOCK_K=BLOCK_K)
    return KernelConfig(constants, num_warps=8, num_stages=1 if table == "load" else 3)


def vq_linear(x, codebook, indices, bias=None, table=None):
    """x (..., K) -> (..., N): x W^T + bias, W (N, K) the VQ weight of codebook (G, k, d) and indices (N * K / d,)
    (any integer dtype; group g = output rows [g N / G, (g + 1) N / G)), computed by the fused kernel in x's dtype.
    table: as kernel_config's."""
    g, k, d = codebook.shape
    if not fused_supports(d):
        raise ValueError(f"the fused VQ kernel needs a power-of-two dim up to {BLOCK_K}, got {d}")
    n_out = indices.shape[0] * d // x.shape[-1]
    lead, k_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    cb = codebook.detach().to(x.dtype).contiguous()
    config = kernel_config(x.dtype, codebook.shape, m, bias is not None, table)
    grid = (triton.cdiv(m, config.constants["BLOCK_M"]), triton.cdiv(n_out, BLOCK_N))
    _vq_matmul_kernel[grid](x2, indices, cb, bias if bias is not None else cb, y, m, n_out, k_in, n_out // g,
                            cb.numel(), x2.stride(0), y.stride(0), **config.constants, num_warps=config.num_warps,
                            num_stages=config.num_stages)
    return y.reshape(*lead, n_out)
