"""Decoding a quantized layer's weight at memory speed: one gather per codebook into a reused buffer.

Measured on this CPU (docs/results.md#decoding-speed): gathering a VQ weight row by row, index_select of a (k, d)
codebook with d = 4, costs about 4.5 ns per sub-vector, while the same bytes gathered as single 16-byte scalars (the
codebook viewed as (k,) complex128, each codeword one element) cost about 0.8 ns; a fresh allocation of the weight
per call adds page faults on top; and for a small layer the Python and dispatcher work around the gather (views,
casts, slicing: about 20 us) costs more than the gather. So:

- a codeword of 1, 2, 4, 8 or 16 bytes is gathered as one scalar of that width (`wide_dtype`); the bytes are copied,
  never computed, so the output equals the row gather bit for bit;
- a forward writes into a per-thread workspace buffer (`workspace`) grown to the largest layer, in place, and
  reused by every layer; the indices are cast once per call into a reused int32 scratch (index_select takes int32
  or int64 indices, not the uint8 the layer stores: an int32 copy of every layer's indices would make the model 4x
  the artifact);
- each layer's decode is a plan (`planned_weight`): the views into the workspace, the codebook cast to the compute
  dtype and viewed wide, made once per (layer, thread) and rebuilt only when the layer's tensors change (a new
  tensor, an in-place write, another dtype); a call then runs one index cast and one gather per codebook;
- on the CPU, where a C compiler built it, the gather is a native loop (vq/kernels/native.py) that reads the stored
  uint8 indices without the int32 cast and copies each codeword in about half index_select's time; same bytes.
"""
import threading
import weakref

import torch

from vq4dit.vq.kernels.native import native_gather

_WIDE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}
_local = threading.local()


def wide_dtype(dim, dtype):
    """The scalar dtype as wide as one codeword of `dim` values of `dtype`, or None when there is none."""
    return _WIDE.get(dim * dtype.itemsize)


def _state():
    if not hasattr(_local, "buffers"):
        _local.buffers, _local.plans = {}, weakref.WeakKeyDictionary()
    return _local


def workspace(slot, numel, dtype, device):
    """A (numel,) view of this thread's workspace buffer `slot` ("weight", "index") for (dtype, device), grown in
    place when a larger layer asks (views handed out before follow it into the new memory), reused by every call.
    Only for values dead before the next call on this thread (a decoded weight under no_grad)."""
    buffers = _state().buffers
    key = (slot, dtype, torch.device(device))
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    elif buf.numel() < numel:
        buf.resize_(numel)
    return buf[:numel]


def release_workspace():
    """Free this thread's decode buffers and plans (they are re-made at the next forward)."""
    _local.buffers, _local.plans = {}, weakref.WeakKeyDictionary()


def workspace_tensors():
    """The decode buffers this thread holds (for memory accounting)."""
    return list(_state().buffers.values())


def workspace_bytes():
    """Bytes held by this thread's decode buffers."""
    return sum(b.untyped_storage().nbytes() for b in workspace_tensors())


def planned_weight(layer, dtype, device):
    """`layer`'s (out, in) weight in `dtype`, decoded into this thread's workspace by its plan: layer.decode_plan
    (dtype, device) -> a function of no arguments that decodes and returns the weight, kept while
    layer.plan_key(dtype) is unchanged. No autograd."""
    plans = _state().plans
    key = layer.plan_key(dtype)
    entry = plans.get(layer)
    if entry is None or entry[0] != key:
        entry = plans[layer] = (key, layer.decode_plan(dtype, device))
    return entry[1]()


def tensor_key(tensor):
    """What identifies a tensor's current contents for a plan: its memory and its in-place write count."""
    return tensor.data_ptr(), tensor._version


def gather_plan(codebook, indices, out):
    """A function of no arguments writing codebook[group][indices] into `out` (N, d) and returning `out`: codebook
    (G, k, d) in out's dtype, indices (N,) any integer dtype (group g = the g-th N/G of them), read at each call."""
    g, k, d = codebook.shape
    n = indices.shape[0]
    cpu = indices.device.type == "cpu" and indices.is_contiguous() and out.is_contiguous()
    native = native_gather() if cpu else None
    wide = _WIDE.get(d * codebook.element_size())
    if wide is not None:  # one scalar per codeword: index_select's fast 1-D path
        table, dest = codebook.detach().contiguous().view(wide).view(g, k), out.view(wide).view(n)
    else:  # a codeword of another width (e.g. d = 3 or 8 in float32): rows of d values
        table, dest = codebook.detach().contiguous(), out
    if native is not None:  # one call for every group, reading the stored indices as they are: no int32 copy
        run_native = native(table, indices, dest)

        def run_all():
            run_native(torch.get_num_threads())
            return out

        return run_all
    index = workspace("index", n, torch.int32, indices.device)
    per_group = n // g
    parts = [(table[i], index[i * per_group:(i + 1) * per_group], dest[i * per_group:(i + 1) * per_group])
             for i in range(g)]

    def run():
        index.copy_(indices)
        for part_table, part_index, part_dest in parts:
            torch.index_select(part_table, 0, part_index, out=part_dest)
        return out

    return run


def gather_codewords(codebook, indices, out=None):
    """codebook (G, k, d), indices (N,) any integer dtype (group g = the g-th N/G of them) -> (N, d) codewords in
    the codebook's dtype, written into `out` when given or a new tensor. No autograd."""
    if out is None:
        out = torch.empty(indices.shape[0], codebook.shape[2], dtype=codebook.dtype, device=codebook.device)
    return gather_plan(codebook, indices, out)()
