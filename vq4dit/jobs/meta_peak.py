"""The most bytes a computation holds at once, measured on the meta device (no memory, no arithmetic).

Every tensor an operation returns is counted while any tensor still refers to its storage (views share it); the
peak of that count is what the computation needs beyond the tensors it started from. An operation that returns the
storage of one of its inputs from before (an in-place update of a weight, a view of one) creates nothing. Attention
runs as a fused kernel (flash or memory-efficient, as CUDA runs fp32 attention and the CPU's flash kernel does): its
output only, never the (heads, tokens, tokens) score matrix.
"""
import functools
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


def tensors_in(tree):
    """The tensors in an ATen operation's arguments or result: a tensor, or tuples, lists and dicts of them beside
    scalars (the only containers an operation's schema has; torch's general pytree walk costs 3x more here)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    found, stack = [], [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages operations create while it is active: `held` now, `peak` at most."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage -> [bytes, tensors referring to it]
        self.refs = {}  # id -> a weak reference to a counted tensor, whose callback uncounts it when it is freed
        self.held = self.peak = 0

    def _drop(self, key, ref):
        del self.refs[id(ref)]
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.held -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tensors_in(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live:
                self.live[key][1] += 1
            else:
                if inputs is None:
                    inputs = {i.untyped_storage()._cdata for i in tensors_in((args, kwargs))}
                if key in inputs:  # an input's own storage (an in-place op, a view) from before: nothing new
                    continue
                self.live[key] = [storage.nbytes(), 1]
                self.held += storage.nbytes()
                self.peak = max(self.peak, self.held)
            ref = weakref.ref(t, functools.partial(self._drop, key))
            self.refs[id(ref)] = ref
        return out


def fused_attention(query, key, value, *args, **kwargs):
    """F.scaled_dot_product_attention as a fused kernel allocates: the output alone, (B, heads, T, D) laid out as
    (B, T, heads, D) as the flash kernels of CPUs and GPUs lay it out (so the usual transpose(1, 2) and reshape to
    (B, T, heads * D) after attention is a view, not a copy)."""
    if query.dim() != 4:
        return query.new_empty(*query.shape[:-1], value.shape[-1])
    b, heads, t, _ = query.shape
    return query.new_empty(b, t, heads, value.shape[-1]).transpose(1, 2)


def peak_bytes(fn):
    """The most bytes `fn()` (on meta tensors, without gradients) holds at once beyond its inputs."""
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, fused_attention
    try:
        with torch.no_grad(), LiveBytes() as counter:
            fn()
    finally:
        F.scaled_dot_product_attention = sdpa
    return counter.peak


# torch.autocast's op lists (aten/src/ATen/autocast_mode.{h,cpp}, torch 2.13), by the name an op has at the Python
# level (F.linear, Tensor.matmul and torch.matmul alike; einsum, whose bmm autocast casts inside): the matmul family,
# convolutions and attention run in the lower precision (CUDA's list also has the matrix-vector products); CUDA runs
# norms, softmax, reductions, transcendental ops and upsampling in float32, the CPU only the losses
_LOWER = {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "einsum",
          "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
          "scaled_dot_product_attention"}
LOWER_PRECISION = {"cpu": frozenset(_LOWER),
                   "cuda": frozenset({*_LOWER, "addmv", "addr", "mv", "chain_matmul", "multi_dot"})}
_LOSSES = {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "nll_loss", "cross_entropy",
           "binary_cross_entropy_with_logits", "cosine_embedding_loss", "margin_ranking_loss", "soft_margin_loss"}
FLOAT32 = {
    "cpu": frozenset(_LOSSES),
    "cuda": frozenset({*_LOSSES, "layer_norm", "group_norm", "rms_norm", "softmax", "log_softmax", "sum", "prod",
                       "cumsum", "cumprod", "pow", "__pow__", "__rpow__", "exp", "expm1", "log", "log1p", "log2",
                       "log10", "rsqrt", "reciprocal", "__rtruediv__", "__rdiv__", "softplus", "norm", "normalize",
                       "logsumexp", "cdist", "dist", "cosine_similarity", "erfinv", "acos", "asin", "cosh", "sinh",
                       "tan", "interpolate"})}


def _cast(tree, src, dst):
    """`tree` (a function's arguments) with every tensor of a dtype in `src` cast to `dst`."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dst) if tree.dtype in src else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast(item, src, dst) for item in tree)
    if isinstance(tree, dict):
        return {key: _cast(item, src, dst) for key, item in tree.items()}
    return tree


class PlannedAutocast(TorchFunctionMode):
    """torch.autocast(device_type, dtype) for meta tensors, which torch.autocast refuses: the casts it makes before
    each op of its lists, made above autograd as autocast makes them, so the backward keeps the cast copies. Not
    modelled: autocast's cache of cast weights (each call casts its weight again; a block uses each weight once)."""

    def __init__(self, device_type, dtype=torch.bfloat16):
        super().__init__()
        kind = device_type if device_type in FLOAT32 else "cuda"  # another accelerator: CUDA's lists
        self.lower_precision, self.float32, self.dtype = LOWER_PRECISION[kind], FLOAT32[kind], dtype

    def lower(self, tree):
        """`tree` with its float32 tensors in the autocast dtype (the lower-precision policy)."""
        return _cast(tree, {torch.float32}, self.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None)
        if name in self.lower_precision:
            args, kwargs = self.lower((args, kwargs or {}))
        elif name in self.float32:
            args, kwargs = _cast((args, kwargs or {}), {torch.float16, torch.bfloat16}, torch.float32)
        return func(*args, **(kwargs or {}))
