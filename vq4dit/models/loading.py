"""Build a DiT from the registry and load its weights, whatever format they come in.

Formats: our safetensors (spec and a content digest in the header), the official plain state dict `.pt`
(`DiT-XL-2-256x256.pt`), a training checkpoint dict (its `ema` is used), and diffusers format
(a directory with config.json + diffusion_pytorch_model.*, its parent with `transformer/`, or a hub id).

Weights are read once (models/checkpoint_files.py: memory-mapped, integrity-checked) and assigned to a skeleton
built on the meta device, so loading peaks near the weights' size, not twice it.
"""
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vq4dit.models.checkpoint_files import DIGEST_KEY, read_state_file, refuse_artifact_file, state_digest
from vq4dit.models.diffusers_format import from_diffusers_state_dict, is_diffusers_state_dict, spec_fields_from_config
from vq4dit.models.dit import DiT_configs, DiT_models, sincos_pos_embed_2d
from vq4dit.models.pipelines import pipeline_id_like
from vq4dit.utils.errors import UserError, error_detail
from vq4dit.utils.fileio import atomic_path
from vq4dit.utils.hubid import local_reading
from vq4dit.utils.resources import EMBEDDED_DIT

logger = logging.getLogger(__name__)

LATENT_DOWNSAMPLE = 8  # the SD VAE maps 8x8 pixels to one latent position
DEFAULT_IMAGE_SIZE = 256
DEFAULT_NUM_CLASSES = 1000
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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

    @property
    def image_size(self):
        """Pixel size of the images: latent models (4 channels) are decoded by the VAE at 8x."""
        return self.input_size * LATENT_DOWNSAMPLE if self.in_channels == 4 else self.input_size

    @classmethod
    def of(cls, model, name):
        return cls(name, model.input_size, model.num_classes, model.in_channels, model.learn_sigma)


def embedded_ckpt_path():
    return Path(EMBEDDED_DIT)


def save_dit(model, name, path, extra=None):
    """Save a full-precision DiT as safetensors; its spec, a content digest (and `extra` strings) go in the header."""
    meta = {"format": "vq4dit-dit", "spec": json.dumps(asdict(DiTSpec.of(model, name))), **(extra or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta[DIGEST_KEY] = state_digest(state, meta)
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)


def registry_name(depth, hidden, patch, heads=None):
    """The registry model with this architecture, or None."""
    for name, (d, h, n, p) in DiT_configs.items():
        if (d, h, p) == (depth, hidden, patch) and heads in (None, n):
            return name
    return None


def describe_weights(state):
    """A guess of what an official-key state dict is: registry name (if any), architecture and sizes."""
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        w = state["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    except (KeyError, ValueError, IndexError):
        return "no DiT (no blocks.* or x_embedder.proj.weight keys)"
    name = registry_name(depth, hidden, patch) or "no registry model"
    text = f"{name} (depth {depth}, hidden {hidden}, patch {patch}, {in_channels} input channels"
    if "pos_embed" in state:
        input_size = round(state["pos_embed"].shape[1] ** 0.5) * patch
        size = input_size * LATENT_DOWNSAMPLE if in_channels == 4 else input_size
        text += f", image size {size}"
    if "y_embedder.embedding_table.weight" in state:
        text += f", {state['y_embedder.embedding_table.weight'].shape[0] - 1} classes"
    return text + ")"


def _check_matches(model, state, name, source):
    """Raise UserError naming the first key or shape where `state` differs from `model`'s state dict."""
    expected = model.state_dict()
    problem = None
    for key, value in expected.items():
        if key not in state:
            problem = f"missing key {key!r}"
        elif tuple(state[key].shape) != tuple(value.shape):
            problem = f"{key!r} has shape {tuple(state[key].shape)}, {name} expects {tuple(value.shape)}"
        if problem:
            break
    if problem is None:
        extra = [k for k in state if k not in expected]
        problem = f"unexpected key {extra[0]!r}" if extra else None
    if problem:
        raise UserError(f"{source} does not match model {name}: {problem}; the weights look like "
                        f"{describe_weights(state)}; pass the matching --model/--image-size/--num-classes")


def diffusers_dit_dir(path, source):
    """(directory, spec_fields_from_config's fields) of the diffusers DiT in the local directory `path` (itself or its
    transformer/: config.json + weights); a UserError naming what `path` holds instead (a quantized artifact, another
    family's transformer, no weights). The load and the dry run's plan (jobs/plan_sources.py) both ask it."""
    directory = next((d for d in (path / "transformer", path) if (d / "config.json").is_file()
                      and any((d / f).is_file() for f in _WEIGHT_FILES)), None)
    if directory is None:
        if (path / "model.safetensors").is_file():  # a quantized artifact's is refused naming sample.py --quantized
            refuse_artifact_file(path / "model.safetensors")
        raise UserError(f"{source} is a directory without a diffusers DiT (config.json + "
                        f"{' or '.join(_WEIGHT_FILES)}, directly or under transformer/)")
    return directory, spec_fields_from_config(json.loads((directory / "config.json").read_text()), source)


def check_ckpt_exists(ckpt):
    """A UserError when `ckpt` is neither a local path nor a string that looks like a hub id (which a load fetches)."""
    if Path(ckpt).expanduser().exists():
        return
    if not pipeline_id_like(ckpt):  # a missing checkpoint file
        raise UserError(f"checkpoint {ckpt} does not exist; give a .pt/.safetensors file, "
                        "a diffusers directory or a hub id like facebook/DiT-XL-2-256")


def _resolve(ckpt):
    """A local Path for `ckpt`; a string that is no local path but looks like a hub id is downloaded."""
    path = Path(ckpt).expanduser()
    if path.exists():
        return path
    check_ckpt_exists(ckpt)
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{sub}{f}" for sub in ("", "transformer/") for f in ("config.json", *_WEIGHT_FILES)]
        return Path(snapshot_download(str(ckpt), allow_patterns=patterns))
    except Exception as e:
        raise UserError(f"checkpoint {ckpt} is not a local path{local_reading(ckpt)} and downloading it as a hub id "
                        f"failed: {error_detail(e)}") from None


def _sizes(image_size, num_classes, in_channels, state):
    """input_size and num_classes: given values, else read from the weights, else the ImageNet defaults."""
    patch = state["x_embedder.proj.weight"].shape[2] if "x_embedder.proj.weight" in state else 2
    if image_size is None and "pos_embed" in state:
        input_size = round(state["pos_embed"].shape[1] ** 0.5) * patch
    else:
        image_size = image_size or DEFAULT_IMAGE_SIZE
        if in_channels == 4 and image_size % LATENT_DOWNSAMPLE:
            raise UserError(f"--image-size {image_size} is not a multiple of {LATENT_DOWNSAMPLE} (latent model)")
        input_size = image_size // LATENT_DOWNSAMPLE if in_channels == 4 else image_size
    if num_classes is None:
        table = state.get("y_embedder.embedding_table.weight")
        num_classes = table.shape[0] - 1 if table is not None else DEFAULT_NUM_CLASSES
    return input_size, num_classes


def _infer_arch(state):
    w = state.get("x_embedder.proj.weight")
    blocks = [k for k in state if k.startswith("blocks.")]
    if w is None or not blocks:
        return None, 4
    depth = 1 + max(int(k.split(".")[1]) for k in blocks)
    return registry_name(depth, w.shape[0], w.shape[2]), w.shape[1]


def _learn_sigma(state, in_channels):
    w = state.get("final_layer.linear.weight")  # (p*p*out_channels, D)
    patch = state["x_embedder.proj.weight"].shape[2] if "x_embedder.proj.weight" in state else 2
    return w is None or w.shape[0] == patch * patch * in_channels * 2


def refuse_non_dit(state, source):
    """The UserError of a state dict without the DiT's x_embedder.proj.weight: a DiT whose names carry a wrapper's
    prefix (DDP's module., torch.compile's _orig_mod.), or the weights of another network."""
    wrapped = next((k[:-len("x_embedder.proj.weight")] for k in state if k.endswith(".x_embedder.proj.weight")), None)
    if wrapped is not None:
        raise UserError(f"{source}: a DiT whose tensor names carry the prefix {wrapped!r} (a DDP or torch.compile "
                        "wrapper's); save the unwrapped model's state_dict(), or strip the prefix from every name")
    raise UserError(f"{source}: not a DiT checkpoint (no x_embedder.proj.weight; its {len(state)} tensors are named "
                    f"like {', '.join(list(state)[:3])}); give a DiT .pt/.safetensors file, a diffusers DiT directory "
                    "or a pipeline")


def check_model_name(name):
    """A UserError naming --model `name` and the valid names when the registry has no such DiT."""
    if name not in DiT_models:
        raise UserError(f"unknown --model {name!r}; valid: {', '.join(DiT_models)}")


def _build_checked(name, spec_args, state, source, stored_dtype=False):
    check_model_name(name)
    if not spec_args[3]:  # learn_sigma
        raise UserError(f"{source}: the model predicts the noise only (learn_sigma=False); this sampler is DiT's "
                        "learned-variance DDPM and needs the noise and variance outputs of every released DiT")
    spec = DiTSpec(name, *spec_args)
    with torch.device("meta"):
        model = spec.build()  # no memory: the weights read from the file become the parameters
    _check_matches(model, state, name, source)
    model.load_state_dict(_float32(state, source, stored_dtype), strict=True, assign=True)
    on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if on_meta:
        raise RuntimeError(f"{len(on_meta)} tensors of {name} got no value on load (first: {on_meta[0]})")
    return model, spec


def _float32(state, source, stored_dtype=False):
    """The state with every tensor float32, as the DiT keeps its weights (a no-op for fp32 checkpoints);
    stored_dtype: each tensor as the file stores it (a streamed teacher upcasts it block by block:
    models/offload.py)."""
    bad = next((k for k, v in state.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise UserError(f"{source}: tensor {bad} is {state[bad].dtype}; a DiT's weights are floating point")
    return {k: v if v.dtype == torch.float32 or stored_dtype else v.float() for k, v in state.items()}


def _load_diffusers(path, name, image_size, num_classes, source, stored_dtype=False):
    directory, fields = diffusers_dit_dir(path, source)
    depth, hidden, heads, patch, input_size, n_cls, in_ch, learn_sigma = fields
    weights = next(directory / f for f in _WEIGHT_FILES if (directory / f).is_file())
    state, _ = read_state_file(weights)
    state = from_diffusers_state_dict(state, source)
    guess = registry_name(depth, hidden, patch, heads)
    name = name or guess
    if name is None:
        raise UserError(f"{source}: diffusers DiT (depth {depth}, hidden {hidden}, heads {heads}, patch {patch}) "
                        f"matches no registry model; valid: {', '.join(DiT_models)}")
    if name in DiT_configs and DiT_configs[name][2] != heads:
        raise UserError(f"{source} has {heads} attention heads, model {name} has {DiT_configs[name][2]}; "
                        f"the weights look like {guess or 'no registry model'}")
    if image_size is not None and DiTSpec(name, input_size, n_cls, in_ch).image_size != image_size:
        raise UserError(f"--image-size {image_size} does not match {source} (sample_size {input_size})")
    if num_classes is not None and num_classes != n_cls:
        raise UserError(f"--num-classes {num_classes} does not match {source} ({n_cls} classes)")
    # diffusers does not store the fixed sin-cos table; it is the same function of (hidden, grid)
    table = sincos_pos_embed_2d(hidden, input_size // patch)  # (T, D)
    state["pos_embed"] = torch.from_numpy(table).float().unsqueeze(0)
    return _build_checked(name, (input_size, n_cls, in_ch, learn_sigma), state, source, stored_dtype)


def load_dit(name, ckpt=None, image_size=None, num_classes=None, device="cpu", stored_dtype=False):
    """Load a DiT: returns (model in eval mode on `device`, DiTSpec); stored_dtype: its tensors in the dtypes the
    file stores (else fp32).

    name: registry name, or None to take it from the weights. ckpt: None for the embedded digits
    model, else a file, a diffusers directory or a hub id. image_size/num_classes: None to read
    them from the weights (ImageNet defaults 256/1000 where the weights do not say).
    """
    if name is not None:
        check_model_name(name)  # before any hint about the checkpoint it would need
    embedded = ckpt is None
    if embedded:
        path = embedded_ckpt_path()
        if not path.is_file():
            raise UserError(f"the embedded model {EMBEDDED_DIT} is missing; train it with "
                            "python scripts/train_digits_dit.py or pass --ckpt")
        ckpt = str(path)
    source = str(ckpt)
    path = _resolve(ckpt)
    if path.is_dir():
        model, spec = _load_diffusers(path, name, image_size, num_classes, source, stored_dtype)
    else:
        state, meta = read_state_file(path)
        if meta.get("format") == "vq4dit-dit":
            spec = DiTSpec(**json.loads(meta["spec"]))
            image_size = image_size or spec.image_size
            num_classes = num_classes or spec.num_classes
            wanted = (name or spec.name, image_size, num_classes)
            if embedded and wanted != (spec.name, spec.image_size, spec.num_classes):
                asked = wanted[0] + (f" at {image_size}px" if image_size != spec.image_size else "") + (
                    f" with {num_classes} classes" if num_classes != spec.num_classes else "")
                raise UserError(f"no --ckpt given: without one only the embedded {spec.name} ({spec.image_size}px, "
                                f"{spec.num_classes} classes) is available; {asked} needs --ckpt (its checkpoint, "
                                "e.g. DiT-XL-2-256x256.pt)")
            if (image_size, num_classes) != (spec.image_size, spec.num_classes):
                raise UserError(f"{source} is a {spec.image_size}px model with {spec.num_classes} classes, "
                                f"not {image_size}px with {num_classes}")
            model, spec = _build_checked(name or spec.name, (spec.input_size, spec.num_classes, spec.in_channels,
                                                             spec.learn_sigma), state, source, stored_dtype)
        elif is_diffusers_state_dict(state):
            raise UserError(f"{source} holds diffusers-format weights; pass the directory with its config.json")
        else:
            if "x_embedder.proj.weight" not in state:  # no --model can help: say what the file holds instead
                refuse_non_dit(state, source)
            guess, in_channels = _infer_arch(state)
            if name is None and guess is None:
                raise UserError(f"{source}: cannot tell which model these weights are: {describe_weights(state)}; "
                                f"pass --model (valid: {', '.join(DiT_models)})")
            input_size, num_classes = _sizes(image_size, num_classes, in_channels, state)
            spec_args = (input_size, num_classes, in_channels, _learn_sigma(state, in_channels))
            model, spec = _build_checked(name or guess, spec_args, state, source, stored_dtype)
    logger.info("loaded %s from %s", spec.name, source)
    return model.to(device).eval(), spec

