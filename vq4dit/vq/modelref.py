"""Model references: a JSON-able dict naming a model class and the config that rebuilds it, weights aside.

    {"class": "<module>.<QualName>", "config": {...constructor arguments...}, ...extra keys kept verbatim}

This is diffusers' own convention (a class plus a config; `cls.from_config(config)` rebuilds the model), which
the project's DiT follows too (models/dit.py), so vq/ needs to know no particular model. Artifacts store a
reference as their base model; only classes under TRUSTED_PREFIXES are ever imported from one, so a file cannot
name arbitrary code to run.
"""
import contextlib
import importlib
import json
import re
from collections.abc import Mapping

from torch import nn

from vq4dit.utils.errors import UserError, error_detail

TRUSTED_PREFIXES = ("vq4dit.models.", "diffusers.")
# artifacts written before the modules moved under the vq4dit package name the project's DiT as models.dit.DiT
LEGACY_PREFIX, LEGACY_TARGET = "models.", "vq4dit.models."
_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def reference(model, **extra):
    """The reference of `model`: its class path, its `config` (a mapping, e.g. diffusers' FrozenDict) as a plain
    JSON-able dict without diffusers' private bookkeeping keys (`_class_name`, `_use_default_values`, ...), and
    `extra` (JSON-able facts such as a registry name) kept verbatim."""
    cls = type(model)
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        raise TypeError(f"{cls.__name__} has no `config` mapping of its constructor arguments; cannot reference it")
    if {"class", "config"} & extra.keys():
        raise TypeError("extra keys of a model reference may not be named 'class' or 'config'")
    ref = {"class": f"{cls.__module__}.{cls.__qualname__}",
           "config": {k: v for k, v in config.items() if not str(k).startswith("_")}, **extra}
    try:
        ref = json.loads(json.dumps(ref, allow_nan=False))  # tuples -> lists: exactly what a file gives back
    except (TypeError, ValueError) as e:
        raise TypeError(f"the reference of {cls.__name__} is not JSON-able: {e}") from None
    if model_class(ref) is not cls:
        raise TypeError(f"{ref['class']} does not import back as {cls.__name__}")
    return ref


def model_class(ref):
    """The nn.Module class a reference names; anything outside TRUSTED_PREFIXES, or not importable, or without
    `from_config`, is a UserError naming the class."""
    path = ref.get("class") if isinstance(ref, Mapping) else None
    if isinstance(path, str) and path.startswith(LEGACY_PREFIX):
        path = LEGACY_TARGET + path[len(LEGACY_PREFIX):]
    if not isinstance(path, str) or not _CLASS_PATH.fullmatch(path) or not path.startswith(TRUSTED_PREFIXES):
        raise UserError(f"model class {path!r} is not allowed: a model reference may only name a class under "
                        f"{' or '.join(TRUSTED_PREFIXES)}")
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name, None)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and callable(getattr(obj, "from_config", None)):
            return obj
        break
    raise UserError(f"model class {path!r} does not exist in this installation or cannot be rebuilt from a config "
                    "(no nn.Module with from_config by that name)")


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def parameters_on_meta():
    """Within the block every parameter a module registers is moved to the meta device (one tensor at a time, so at
    most one is ever allocated); buffers stay real, since a model may compute non-persistent ones in __init__
    (e.g. diffusers' pos_embed) that no state dict holds. torch.nn.init functions leave meta tensors alone: their
    values are never used, and the first normal_ on meta would import torch's decompositions (70 MiB)."""
    register = nn.Module.register_parameter
    inits = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    def skipping_meta(init):
        def run(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)
        return run

    nn.Module.register_parameter = register_on_meta
    for name, init in inits.items():
        setattr(nn.init, name, skipping_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, init in inits.items():
            setattr(nn.init, name, init)


def build_skeleton(ref, source="model reference"):
    """The model a reference describes, parameters on the meta device (no memory), buffers real.

    Fill it with `load_state_dict(state, assign=True)`. A config the class rejects is a UserError naming `source`.
    """
    try:
        cls = model_class(ref)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    config = ref.get("config")
    if not isinstance(config, Mapping):
        raise UserError(f"{source}: the model reference has no config mapping")
    try:
        with parameters_on_meta():
            return cls.from_config(dict(config))
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        detail = error_detail(e)
        raise UserError(f"{source}: cannot build {ref['class']} from its config ({detail})") from None
