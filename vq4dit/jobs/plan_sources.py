"""Where a memory plan's model comes from, without weights: a pipeline directory's configs, the published configs of
REFERENCE_MODELS (hub ids planned without fetching anything), or a DiT spec; each built on the meta device. Also
what a run's pipeline adds on the host: its text encoders and the libraries of its components."""
import json
import logging
from pathlib import Path

from vq4dit.utils.errors import UserError

logger = logging.getLogger(__name__)

# published transformer configs (transformer/config.json of each hub repository; see README for how they were read)
REFERENCE_MODELS = {
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": ("PixArtTransformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
        attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
        attention_bias=True, interpolation_scale=2, use_additional_conditions=False)),
    "stabilityai/stable-diffusion-3.5-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm")),
    "black-forest-labs/FLUX.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56])),
}
REFERENCE_VAE_FACTOR = 8  # the 4-block AutoencoderKL of all three


def plan_source(ckpt):
    """(transformer class name, config dict, VAE factor, pipeline directory or None) of a local pipeline directory
    or a hub id of REFERENCE_MODELS; None for anything else (a DiT checkpoint, another hub id: nothing is fetched); a
    UserError for a path that does not exist."""
    if ckpt is None:
        return None
    from vq4dit.models.loading import check_ckpt_exists

    check_ckpt_exists(ckpt)
    path = Path(ckpt).expanduser()
    if (path / "model_index.json").is_file():
        from vq4dit.models.adapters.t2i import vae_scale_factor
        from vq4dit.models.pipelines import transformer_class

        config = json.loads((path / "transformer" / "config.json").read_text())
        return transformer_class(path)[1], config, vae_scale_factor(path), path
    if str(ckpt) in REFERENCE_MODELS:
        name, config = REFERENCE_MODELS[str(ckpt)]
        return name, config, REFERENCE_VAE_FACTOR, None
    return None


def warn_preset_family(preset, ckpt):
    """Warn when the YAML preset at `preset` names a reference model (REFERENCE_MODELS) of another transformer class
    than the local pipeline `ckpt` quantized with it: its teacher settings (steps, guidance, cache dtype) are that
    model's (--config flux_dev_w2 --ckpt SD3_PIPELINE ran Flux's 28 steps at guidance 3.5 without a word). A
    fine-tune of the preset's class is not warned about."""
    from vq4dit.models.pipelines import is_pipeline_dir, transformer_class
    from vq4dit.utils.resources import config_path
    from vq4dit.utils.yamlfile import read_yaml

    reference = str(read_yaml(config_path(preset)).get("ckpt")) if preset is not None else None
    path = Path(str(ckpt)).expanduser() if ckpt is not None else None
    if reference not in REFERENCE_MODELS or path is None or not is_pipeline_dir(path):
        return
    try:
        given = transformer_class(path)[1]
    except UserError:
        return  # the load names what is wrong with the directory
    expected = REFERENCE_MODELS[reference][0]
    if given != expected:
        logger.warning("--config %s is the preset of %s (a %s); %s holds a %s: its teacher settings (steps, "
                       "guidance, cache dtype) are tuned for the other model", preset, reference, expected, ckpt,
                       given)


def meta_model(name, config):
    """The diffusers model class `name` built from `config`, every parameter and buffer on the meta device (tables
    computed at construction too, e.g. SD3's 384 x 384 position embeddings: 1.8 GB on a real device)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, name).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return model.eval()


def dit_source(spec):
    """(DiTSpec, VAE factor) of ModelSpec `spec` when it names a DiT that builds without reading its weights: the
    embedded model (no ckpt) or a vq4dit safetensors file (the spec from the file's header), or a registry --model
    with a checkpoint file of another format or none yet (ImageNet latents at image_size, default 256, and
    num_classes, default 1000); else None. A local directory that is no pipeline is None when it holds a diffusers
    DiT, and the run's UserError when it holds anything else (models.loading.diffusers_dit_dir)."""
    from safetensors import SafetensorError, safe_open

    from vq4dit.models.dit import DiT_models
    from vq4dit.models.loading import (
        LATENT_DOWNSAMPLE,
        DiTSpec,
        check_model_name,
        diffusers_dit_dir,
        embedded_ckpt_path,
    )

    path = embedded_ckpt_path() if spec.ckpt is None else Path(spec.ckpt).expanduser()
    if path.is_dir():  # no pipeline (plan_source): the run loads it as a diffusers DiT or refuses it, as here
        diffusers_dit_dir(path, spec.ckpt)
        return None
    if not path.is_file():
        return None
    if spec.model is not None:
        check_model_name(spec.model)  # as the run would: a plan of another model is no plan of this one
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        if path.suffix == ".safetensors":  # else a .pt checkpoint, which the plan takes at --image-size
            raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); no plan") from None
        meta = {}
    embedded_other = spec.ckpt is None and spec.model in DiT_models and spec.model != json.loads(
        meta.get("spec", "{}")).get("name")  # a registry model without its --ckpt (a preset): plan that one
    if meta.get("format") == "vq4dit-dit" and not embedded_other:
        dit = DiTSpec(**json.loads(meta["spec"]))
    elif spec.model in DiT_models:
        dit = DiTSpec(spec.model, (spec.image_size or 256) // LATENT_DOWNSAMPLE, spec.num_classes or 1000, 4)
    else:
        return None
    return dit, LATENT_DOWNSAMPLE if dit.in_channels == 4 else 1


def meta_dit(dit):
    """The DiT of DiTSpec `dit` on the meta device (its sin-cos table is built on the CPU, then moved)."""
    import torch

    with torch.device("meta"):
        model = dit.build()
    return model.to("meta").eval()


def plan_device(device):
    """The device a run of --device `device` uses: auto is CUDA when this machine has it."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def text_encoder_bytes(directory, by_layer=False):
    """Bytes of the text encoders of the pipeline at `directory` (None: 0) as the job holds them on the CPU to encode
    the prompts: in the dtype their configs name (fp32 when none), as transformers loads them; by_layer: computing
    in fp32 one layer at a time (pipeline_runs.teacher_pipeline: the parts outside the layers in fp32, the layers
    as stored, and the largest layer's fp32 copy while it runs). Built on meta from their configs."""
    if directory is None:
        return 0
    import torch
    import transformers

    from vq4dit.models.adapters.pipeline_runs import layer_lists
    from vq4dit.models.pipelines import read_index

    total = 0
    for name, entry in read_index(directory).items():
        cls = getattr(transformers, entry[1], None) if isinstance(entry, list) and entry[0] == "transformers" else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            continue
        config = transformers.AutoConfig.from_pretrained(str(directory), subfolder=name)
        stored = getattr(config, "dtype", None)
        stored = (getattr(torch, stored) if isinstance(stored, str) else stored or torch.float32).itemsize
        with torch.device("meta"):
            encoder = cls._from_config(config)
        weights = sum(t.numel() for t in encoder.parameters())
        layers = [sum(t.numel() for t in layer.parameters()) for _, layer in layer_lists(encoder)] if by_layer else []
        total += (weights - sum(layers)) * (4 if by_layer else stored) + sum(layers) * stored + 4 * max(layers or [0])
        total += sum(b.numel() * b.element_size() for b in encoder.buffers())
    return total


def pipeline_classes(directory):
    """[(library, class name)] of the components of the pipeline at `directory` (None: [])."""
    if directory is None:
        return []
    from vq4dit.models.pipelines import read_index

    return [(e[0], e[1]) for k, e in read_index(directory).items() if isinstance(e, list) and e[0] and e[1]]


def stored_bytes(model, pipeline, directory=None):
    """Host bytes of `model` (on meta) as its checkpoint stores it, as a streamed run keeps its teacher: the dtype
    of the transformer's safetensors files under pipeline `directory`, else bf16 for a `pipeline` (the dtype the
    large published ones store; a config-only directory has no weights to read) and fp32 for a DiT."""
    import torch

    from vq4dit.models.pipelines import widest_stored_dtype

    dtype = widest_stored_dtype(Path(directory) / "transformer") if directory is not None else None
    dtype = dtype or (torch.bfloat16 if pipeline else torch.float32)
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in [*model.parameters(), *model.buffers()])


def stored_is_mapped(pipeline, directory=None):
    """Whether a streamed run's host teacher is a view of its checkpoint files' mapped pages (shared by the processes
    of a machine, utils/host_memory.py): a pipeline's transformer whose files store one floating dtype (loaded as
    stored, nothing converted); a config-only directory is taken to be as published (bf16 only). A DiT is counted
    per process: its .safetensors loads are mapped too, but a diffusers-format DiT is converted (an over-count of at
    most its weights, 2.7 GB for DiT-XL/2)."""
    if not pipeline:
        return False
    from vq4dit.models.pipelines import stored_float_dtypes

    return directory is None or len(stored_float_dtypes(Path(directory) / "transformer")) <= 1


def plans_stream(stream, device, peaks):
    """Whether a run of --stream `stream` on `device` streams, given the PlanPeaks `peaks` of its unstreamed plan:
    on, off, or auto: on when a CUDA device of this machine holds less than the plan's device peak (a machine
    without it: off, as planned here)."""
    if stream != "auto":
        return stream == "on"
    import torch

    from vq4dit.utils.device import device_memory

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return False
    return peaks.device_peak.device_bytes > device_memory(torch.device(device))
