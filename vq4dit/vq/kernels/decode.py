"""Decoding a quantized layer's weight at memory speed: one gather per codebook into a reused buffer.

Measured on this CPU (docs/results.md#decoding-speed): gathering a VQ weight row by row, index_select of a (k, d)
codebook with d = 4, costs about 4.5 ns per sub-vector, while the same bytes gathered as single 16-byte scalars (the
codebook viewed as (k,) complex128, each codeword one element) cost about 1.2 ns; a fresh allocation of the weight
per call adds page faults on top. So a codeword of 1, 2, 4, 8 or 16 bytes is gathered as one scalar of that width
(`wide_dtype`), and a forward writes into a per-thread workspace buffer grown to the largest layer and reused by
every layer (`workspace`), with the indices cast once per call into a reused int32 scratch (index_select takes int32
or int64 indices, not the uint8 the layer stores: keeping an int32 copy of every layer's indices would make the model
4x the artifact). The bytes are copied, never computed: the output equals the row gather bit for bit.
"""
import threading

import torch

_WIDE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
_local = threading.local()


def wide_dtype(dim, dtype):
    """The scalar dtype as wide as one codeword of `dim` values of `dtype`, or None when there is none."""
    return _WIDE.get(dim * dtype.itemsize)


def workspace(slot, numel, dtype, device):
    """A (numel,) tensor of this thread's workspace `slot` ("weight", "index"): one buffer per (slot, dtype,
    device), grown when a larger layer asks, reused by every later call. Only for values dead before the next
    call on this thread (a forward's decoded weight under no_grad); `release_workspace` frees them."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (slot, dtype, device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the smaller one before allocating its successor
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_workspace():
    """Free this thread's decode buffers (they are re-made at the next forward)."""
    _local.buffers = {}


def workspace_tensors():
    """The decode buffers this thread holds (for memory accounting)."""
    return list(getattr(_local, "buffers", {}).values())


def workspace_bytes():
    """Bytes held by this thread's decode buffers."""
    return sum(b.numel() * b.element_size() for b in workspace_tensors())


def gather_codewords(codebook, indices, out=None):
    """codebook (G, k, d), indices (N,) any integer dtype (group g = the g-th N/G of them) -> (N, d) codewords in
    the codebook's dtype, written into `out` when given (e.g. a workspace buffer) or a new tensor. No autograd:
    pass a codebook that does not require grad, or call under torch.no_grad()."""
    g, k, d = codebook.shape
    n = indices.shape[0]
    if out is None:
        out = torch.empty(n, d, dtype=codebook.dtype, device=codebook.device)
    index = workspace("index", n, torch.int32, indices.device)
    index.copy_(indices)
    wide = _WIDE.get(d * codebook.element_size())
    if wide is not None:  # one scalar per codeword: index_select's fast 1-D path
        table, dest = codebook.contiguous().view(wide).view(g * k), out.view(wide).view(n)
    else:  # a codeword of another width (e.g. d = 3 or 8 in float32): rows of d values
        table, dest = codebook.reshape(g * k, d), out
    if g == 1:
        torch.index_select(table, 0, index, out=dest)
        return out
    per_group = n // g
    for group in range(g):
        s, e = group * per_group, (group + 1) * per_group
        torch.index_select(table[group * k:(group + 1) * k], 0, index[s:e], out=dest[s:e])
    return out
