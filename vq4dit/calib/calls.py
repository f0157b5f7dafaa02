"""The structure of a module call: its positional and keyword arguments (or its output) as a JSON-able tree.

A block of a diffusion transformer is called with tensors nested in tuples, lists and dicts, next to plain
constants (None, flags, numbers). `flatten` turns such a value into (spec, tensors): the spec is the same tree
with every tensor replaced by {"t": position} and every constant by {"c": value}; `unflatten` puts tensors
back. The spec is plain JSON, so a recording's wiring can be saved with the calibration state.
"""
import torch

from vq4dit.utils.errors import UserError

CONSTANT_TYPES = (type(None), bool, int, float, str)


def flatten(value, where="value"):
    """value -> (spec, [tensors in depth-first order]); anything but tensors, containers and constants is refused."""
    tensors = []
    return _walk(value, where, tensors), tensors


def _walk(v, path, tensors):
    """flatten's recursion. A module-level function on purpose: a nested recursive closure is a reference cycle
    that keeps every flattened tensor (a block's outputs) alive until the garbage collector runs."""
    if torch.is_tensor(v):
        tensors.append(v)
        return {"t": len(tensors) - 1}
    if isinstance(v, CONSTANT_TYPES):
        return {"c": v}
    if isinstance(v, (tuple, list)):
        return {type(v).__name__: [_walk(item, f"{path}[{i}]", tensors) for i, item in enumerate(v)]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _walk(item, f"{path}.{k}", tensors) for k, item in v.items()}}
    raise UserError(f"{path}: a {type(v).__name__} cannot be recorded for calibration; block arguments must be "
                    "tensors, None, numbers, strings or tuples / lists / dicts of them")


def unflatten(spec, leaf):
    """Rebuild a value from `spec`; `leaf(node)` returns the value of a {"t": ...} node (or any non-constant leaf)."""
    if "c" in spec:
        return spec["c"]
    if "tuple" in spec:
        return tuple(unflatten(s, leaf) for s in spec["tuple"])
    if "list" in spec:
        return [unflatten(s, leaf) for s in spec["list"]]
    if "dict" in spec:
        return {k: unflatten(s, leaf) for k, s in spec["dict"].items()}
    return leaf(spec)


def leaves(spec):
    """The non-constant leaf nodes of `spec` in depth-first order."""
    out = []
    unflatten(spec, out.append)
    return out


def map_leaves(spec, fn):
    """A copy of `spec` with each non-constant leaf node replaced by fn(node) (a new node)."""
    if "c" in spec:
        return spec
    for kind in ("tuple", "list"):
        if kind in spec:
            return {kind: [map_leaves(s, fn) for s in spec[kind]]}
    if "dict" in spec:
        return {"dict": {k: map_leaves(s, fn) for k, s in spec["dict"].items()}}
    return fn(spec)
