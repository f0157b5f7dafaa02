"""diffusers pipelines as base models: find the pipeline directory, read its model_index.json, load its transformer.

A pipeline directory holds model_index.json (the pipeline class and its components) and one folder per
component (transformer/, vae/, scheduler/, text encoders). Only the transformer is quantized; the rest is loaded
from the same source when sampling.
"""
import contextlib
import json
import logging
import sys
from pathlib import Path

from vq4dit.utils.errors import UserError, error_detail
from vq4dit.utils.hubid import hub_id_like, local_reading

logger = logging.getLogger(__name__)

INDEX = "model_index.json"
# what a pipeline download fetches: configs and safetensors weights of every component, tokenizer files
DOWNLOAD_IGNORE = ["*.bin", "*.msgpack", "*.onnx", "*.ckpt", "*.h5", "*.pt", "*.pth"]
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")  # a path to one is never a hub id


@contextlib.contextmanager
def loading_bars():
    """Around a diffusers from_pretrained: its "Loading pipeline components" bar, and transformers' "Loading
    checkpoint shards", off while huggingface_hub's bars are (sample.py / quantize.py -q: utils.cli.quiet_libraries;
    transformers reads the hub's switch only when it is imported, diffusers never)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

    if not are_progress_bars_disabled():
        yield
        return
    libraries = [diffusers_logging, getattr(sys.modules.get("transformers.utils"), "logging", None)]
    turned = [lib for lib in libraries if lib is not None and lib.is_progress_bar_enabled()]
    for lib in turned:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in turned:
            lib.enable_progress_bar()
        disable_progress_bars()  # transformers' enable_progress_bar turns the hub's bars on too


def is_pipeline_dir(path):
    return (Path(path) / INDEX).is_file()


def resolve_pipeline(source):
    """A local pipeline directory for `source` (a directory, or a hub id that is downloaded), or None when `source`
    is a local path that is no pipeline (a checkpoint file or a bare transformer directory)."""
    path = Path(source).expanduser()
    if path.exists():
        return path if is_pipeline_dir(path) else None
    if not pipeline_id_like(source):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), ignore_patterns=DOWNLOAD_IGNORE))
    except Exception as e:
        raise UserError(f"{source} is not a local path{local_reading(source)} and downloading it as a hub pipeline "
                        f"failed: {error_detail(e)}") from None


def pipeline_id_like(source):
    """Whether `source`, a path that does not exist here, reads as a hub id (utils.hubid.hub_id_like: owner/name), but
    not a missing checkpoint file (hub names may hold dots: FLUX.1-dev)."""
    return hub_id_like(source) and Path(source).suffix not in CHECKPOINT_SUFFIXES


def names_pipeline(source):
    """Whether `source` names a diffusers pipeline (resolve_pipeline's test, without downloading): a local directory
    holding model_index.json, or a hub id owner/name."""
    path = Path(source).expanduser()
    return is_pipeline_dir(path) if path.exists() else pipeline_id_like(source)


def uses_pipeline(ckpt, backend):
    """Whether a run of --ckpt `ckpt` and --backend `backend` quantizes a diffusers pipeline's own transformer
    (models.adapters.load.load_model's rule: any backend but vq4dit, which maps DiT weights into the project's DiT),
    so the project DiT's settings do not apply. Nothing is downloaded."""
    return ckpt is not None and backend != "vq4dit" and names_pipeline(ckpt)


def check_pipeline_flags(ckpt, backend, given):
    """A diffusers pipeline's transformer has its own config: the project DiT's settings `given` {flag: value or None}
    would do nothing with it (and an artifact would record them)."""
    flags = [flag for flag, value in given.items() if value is not None]
    if flags and uses_pipeline(ckpt, backend):
        raise UserError(f"{', '.join(flags)}: not used with the diffusers pipeline --ckpt {ckpt} (its transformer's "
                        "config sets the model and its sizes); drop them, or --backend vq4dit to map DiT weights")


def check_dit_flags(ckpt, given):
    """A text-to-image or video pipeline's settings `given` {key: value or None} would do nothing with a DiT
    checkpoint file or the embedded model (`ckpt` None), class-conditional at a fixed size: refused naming them."""
    keys = [key for key, value in given.items() if value is not None]
    if keys and (ckpt is None or Path(ckpt).expanduser().is_file()):
        source = f"the DiT --ckpt {ckpt}" if ckpt is not None else "the embedded digits DiT"
        raise UserError(f"{', '.join(keys)}: not used with {source}, class-conditional at a fixed size (for "
                        "text-to-image and video pipelines: PixArt, SD3, Flux, Wan, ...); drop "
                        f"{'it' if len(keys) == 1 else 'them'}")


def read_index(directory):
    """model_index.json of a pipeline directory as a dict; malformed files are a UserError."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
        if not isinstance(index, dict) or "_class_name" not in index:
            raise ValueError("no _class_name")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a diffusers model_index.json ({e})") from None
    return index


def names_component(directory, component):
    """Whether model_index.json names `component` (a pipeline saved without it has [null, null] there)."""
    entry = read_index(directory).get(component) or [None]
    return entry[-1] is not None


def component_class(directory, component):
    """(library, class name) of a pipeline component, e.g. ("diffusers", "DiTTransformer2DModel")."""
    index = read_index(directory)
    entry = index.get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
        raise UserError(f"{Path(directory) / INDEX}: the pipeline {index['_class_name']} has no {component} "
                        "component")
    return tuple(entry)


# diffusers' legacy Transformer2DModel, named by released pipelines (facebook/DiT-XL-2-256, PixArt-alpha/*), loads as
# the class its norm_type selects (diffusers does the same remapping)
LEGACY_TRANSFORMER = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}


def transformer_class(directory):
    """(library, class name) of a pipeline's transformer, the legacy Transformer2DModel resolved by its norm_type."""
    library, name = component_class(directory, "transformer")
    if (library, name) == ("diffusers", "Transformer2DModel"):
        try:
            norm_type = json.loads((Path(directory) / "transformer" / "config.json").read_text()).get("norm_type")
        except (OSError, ValueError, AttributeError):
            norm_type = None
        name = LEGACY_TRANSFORMER.get(norm_type, name)
    return library, name


def load_transformer(directory, supported=None, stored_dtype=False):
    """The pipeline's transformer (eval mode, CPU, fp32); its class must be one of `supported` (names; None: any
    diffusers model class). stored_dtype: in the widest floating dtype its safetensors files store (bf16 for a bf16
    checkpoint: every value as stored), fp32 when that is unknown."""
    library, name = transformer_class(directory)
    import diffusers

    known = name in supported if supported is not None else _is_model_class(diffusers, name)
    if library != "diffusers" or not known:
        raise UserError(f"{directory}: the pipeline's transformer is {library}.{name}; supported: "
                        f"{', '.join(supported) if supported is not None else 'diffusers model classes'}")
    try:
        dtype = widest_stored_dtype(Path(directory) / "transformer") if stored_dtype else None
        with loading_bars():
            model = getattr(diffusers, name).from_pretrained(str(directory), subfolder="transformer",
                                                             torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{directory}/transformer: cannot load {name} ({error_detail(e)})") from None
    logger.info("loaded %s from %s", name, directory)
    return (model if stored_dtype else model.float()).eval()


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_float_dtypes(directory):
    """The safetensors names ("BF16", "F32", ...) of the floating dtypes the *.safetensors files in `directory` store,
    read from their headers (an empty set: no such file)."""
    import struct

    found = set()
    for path in Path(directory).glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        found |= {e["dtype"] for k, e in header.items() if k != "__metadata__" and e["dtype"] in SAFETENSORS_DTYPES}
    return found


def widest_stored_dtype(directory):
    """The floating torch dtype that holds every floating value the *.safetensors files in `directory` store (read
    from their headers): the one they store, fp32 for several (bf16 and fp16 do not hold each other's values), or
    None (no such file). Loaded in the one dtype they store, the tensors are views of the files' mapped pages
    (utils/host_memory.py); converted, they are copies."""
    import torch

    found = stored_float_dtypes(directory)
    if not found:
        return None
    if len(found) > 1:
        return torch.float64 if "F64" in found else torch.float32
    return getattr(torch, SAFETENSORS_DTYPES[found.pop()])


def _is_model_class(module, name):
    from diffusers import ModelMixin

    cls = getattr(module, name, None)
    return isinstance(cls, type) and issubclass(cls, ModelMixin)


def check_transformer(directory, given):
    """Refuse a transformer `given` to a pipeline whose model_index.json names another class (sample.py --quantized
    SD3_ART --pipeline FLUX_DIR failed deep inside the pipeline). A pipeline saved without its transformer
    ([null, null], as `pipe.transformer = None` writes it) names none; a subclass, or a torch.compile'd model of the
    class, is that class."""
    import diffusers

    if given is None or not names_component(directory, "transformer"):
        return
    name = transformer_class(directory)[1]
    model = getattr(given, "_orig_mod", given)  # torch.compile's wrapper
    cls = getattr(diffusers, name, None)
    if not (isinstance(model, cls) if isinstance(cls, type) else type(model).__name__ == name):
        raise UserError(f"{directory}: its transformer is a {name}, this model a {type(model).__name__}; give the "
                        "pipeline the model came from (sample.py --pipeline DIR)")


def load_pipeline(source, device, **components):
    """The diffusers pipeline at `source` (directory or hub id) with `components` (e.g. transformer=a quantized
    model) taking the place of its own, so those are never loaded from disk; on `device`, progress bars off."""
    directory = resolve_pipeline(source)
    if directory is None:
        raise UserError(f"{source}: not a diffusers pipeline directory (no {INDEX}); pass --pipeline DIR")
    import diffusers

    check_transformer(directory, components.get("transformer"))
    name = read_index(directory)["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise UserError(f"{directory}: pipeline class {name} is not in this diffusers installation")
    try:
        with loading_bars():
            pipe = cls.from_pretrained(str(directory), **components)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{directory}: cannot load the {name} pipeline ({error_detail(e)})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def to_uint8_images(images):
    """A pipeline's float images (N, H, W, 3) in [0, 1] (output_type="np") -> uint8; NaN or Inf (an overflow, which
    uint8 would turn into black pixels) is a utils.errors.NonFiniteOutput."""
    import numpy as np

    from vq4dit.utils.errors import check_finite_output

    check_finite_output(images, "the pipeline's images")
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
