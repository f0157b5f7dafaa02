"""Model adapters: the model specifics the quantize and sample jobs need (see models/adapters/base.py).

`adapter_for(model)` picks the adapter of a model by its class; `load_model(...)` loads a base model from a
checkpoint or a diffusers pipeline and returns it with its adapter and its model reference (vq/modelref.py).
"""
from vq4dit.models.adapters.base import Adapter, TeacherPlan
from vq4dit.models.adapters.diffusers_dit import DiffusersDiTAdapter
from vq4dit.models.adapters.dit import DiTAdapter
from vq4dit.models.adapters.flux import FluxAdapter
from vq4dit.models.adapters.generic import GenericAdapter
from vq4dit.models.adapters.pixart import PixArtAdapter
from vq4dit.models.adapters.sd3 import SD3Adapter
from vq4dit.utils.errors import UserError

ADAPTERS = {
    "DiT": DiTAdapter,  # models.dit.DiT
    "DiTTransformer2DModel": DiffusersDiTAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,  # text-to-image pipelines (models/adapters/t2i.py)
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
}

__all__ = ["ADAPTERS", "Adapter", "TeacherPlan", "adapter_for", "supported_classes"]


def supported_classes():
    return ", ".join(ADAPTERS)


def adapter_for(model):
    """The adapter of `model` (by class name): a dedicated one, else the generic one for a diffusers model; any other
    class is a UserError naming the supported ones."""
    name = type(model).__name__
    if name in ADAPTERS:
        return ADAPTERS[name]()
    if type(model).__module__.startswith("diffusers."):
        return GenericAdapter()
    raise UserError(f"no adapter for model class {name}; supported: {supported_classes()} and any diffusers "
                    "transformer (generic adapter)")
