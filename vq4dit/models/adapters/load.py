"""Load the base model of a quantize or sample job, whatever it is: a DiT checkpoint or a diffusers pipeline."""
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from vq4dit.models.adapters import Adapter, adapter_for
from vq4dit.models.loading import load_dit
from vq4dit.models.pipelines import load_transformer, read_index, resolve_pipeline
from vq4dit.utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class BaseModel:
    model: nn.Module
    adapter: Adapter
    extra: dict = field(default_factory=dict)  # JSON-able facts for the artifact's model reference

    @property
    def num_classes(self):
        return getattr(self.model, "num_classes", None) or getattr(self.model.config, "num_embeds_ada_norm", None)


def load_model(name, ckpt, image_size=None, num_classes=None, backend="auto", device="cpu", stored_dtype=False):
    """The base model on `device` in eval mode (stored_dtype: on the CPU, its tensors in the dtype the checkpoint
    stores them in, for a streamed run: models/offload.py; else fp32).

    backend: "vq4dit" loads a DiT checkpoint into the project's DiT (official / training .pt, safetensors, diffusers
    DiT weights mapped into the original architecture); "diffusers" loads a pipeline's transformer in its own
    form; "auto" is diffusers for a pipeline directory (model_index.json) or a hub id, else vq4dit.
    """
    pipeline = resolve_pipeline(ckpt) if ckpt is not None and backend != "vq4dit" else None
    if backend == "diffusers" and pipeline is None:
        raise UserError(f"--backend diffusers needs a diffusers pipeline directory (with model_index.json) or a hub "
                        f"id, got {ckpt}")
    if pipeline is None:
        model, spec = load_dit(name, ckpt, image_size, num_classes, device="cpu" if stored_dtype else device,
                               stored_dtype=stored_dtype)
        return BaseModel(model, adapter_for(model), {"name": spec.name})
    model = load_transformer(pipeline, stored_dtype=stored_dtype)  # a class without a dedicated adapter: generic
    model = model if stored_dtype else model.to(device)
    adapter = adapter_for(model)
    logger.info("%s", adapter.describe(model))
    return BaseModel(model, adapter, pipeline_reference(ckpt, pipeline))


def pipeline_reference(ckpt, directory):
    """The reference's record of the pipeline a transformer comes from: the class in `directory`'s model_index.json
    and the source `ckpt` (an absolute path when it is local, else the hub id), where sampling finds the pipeline."""
    source = str(Path(ckpt).expanduser().resolve()) if Path(ckpt).expanduser().exists() else str(ckpt)
    return {"pipeline": {"class": read_index(directory)["_class_name"], "source": source}}
