"""Build a DiT from the registry and load its weights (safetensors written by this project)."""
import json
import logging
from dataclasses import asdict, dataclass

from safetensors.torch import load_file, save_file

from models.dit import DiT_models
from utils.fileio import atomic_path

logger = logging.getLogger(__name__)


@dataclass
class DiTSpec:
    """Everything needed to rebuild a DiT skeleton: registry name and constructor arguments."""

    name: str
    input_size: int
    num_classes: int
    in_channels: int
    learn_sigma: bool = True

    def build(self):
        if self.name not in DiT_models:
            raise ValueError(f"unknown model {self.name!r}; valid: {', '.join(DiT_models)}")
        return DiT_models[self.name](input_size=self.input_size, num_classes=self.num_classes,
                                     in_channels=self.in_channels, learn_sigma=self.learn_sigma)

    @classmethod
    def of(cls, model, name):
        return cls(name, model.input_size, model.num_classes, model.in_channels, model.learn_sigma)


def save_dit(model, name, path, extra=None):
    """Save a full-precision DiT as safetensors; its spec (and `extra` strings) go in the header."""
    meta = {"format": "vq4dit-dit", "spec": json.dumps(asdict(DiTSpec.of(model, name))), **(extra or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)


def load_dit_safetensors(path):
    """Load a DiT saved by `save_dit`: returns (model in eval mode, spec)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    spec = DiTSpec(**json.loads(meta["spec"]))
    model = spec.build()
    model.load_state_dict(load_file(path), strict=True)
    return model.eval(), spec


