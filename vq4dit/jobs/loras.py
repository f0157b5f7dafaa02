"""sample.py --lora: LoRAs loaded onto a diffusers pipeline's transformer (quantized or not) as diffusers loads them
in a user's script, each checked to be one of this model's."""
import logging
from dataclasses import dataclass
from pathlib import Path

from vq4dit.utils.errors import UserError, error_detail

logger = logging.getLogger(__name__)
LORA_WEIGHTS = (".lora_A.", ".lora_B.")  # diffusers' (PEFT's) names of a LoRA's two matrices
# a LoRA with more than this share of its layers absent from the transformer is another model's (refused); fewer is
# a sibling's (a Flux-dev LoRA's guidance layers on Flux-schnell): applied with a warning, as diffusers applies it
MOST_ABSENT = 0.5


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to sample with: a file, a directory holding diffusers' pytorch_lora_weights.safetensors, or a hub
    repo id; and its adapter weight."""

    source: str
    scale: float = 1.0


def load_loras(model, extra, loras, pipeline=None, device="cpu"):
    """Load `loras` onto `model`, the transformer of a diffusers pipeline (quantized or not), as adapters lora0,
    lora1, ... at their scales: the pipeline class's own load_lora_weights (diffusers + PEFT; beside a quantized
    layer, a separate full-precision branch: vq/lora.py) on a pipeline holding only `model`, then set_adapters. The
    sampling pipeline is built later around the same model. Only a LoRA's transformer part can be kept that way:
    one with text-encoder layers is refused."""
    if not loras:
        return
    import diffusers

    from vq4dit.models.pipelines import load_pipeline, read_index, resolve_pipeline
    from vq4dit.vq.lora import enable_peft_lora

    recorded = extra.get("pipeline") or {}
    cls = getattr(diffusers, recorded.get("class") or "", None)
    if cls is None or not hasattr(cls, "load_lora_weights"):
        what = f"{recorded['class']} pipelines have" if recorded else "the project's DiT has"
        raise UserError(f"--lora {loras[0].source}: {what} no diffusers LoRA loader (load_lora_weights: Flux, SD3, "
                        "...); drop --lora")
    enable_peft_lora()
    source = pipeline or recorded["source"]
    directory = resolve_pipeline(source)
    if directory is None:
        raise UserError(f"--lora: {source} is not a diffusers pipeline directory (no model_index.json); pass "
                        "--pipeline DIR")
    others = [k for k in read_index(directory) if not k.startswith("_") and k not in ("transformer", "scheduler")]
    pipe = load_pipeline(directory, device, transformer=model, **dict.fromkeys(others))
    names = [f"lora{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras):
        path = Path(lora.source)
        where = {"pretrained_model_name_or_path_or_dict": str(path.parent), "weight_name": path.name} \
            if path.is_file() else {"pretrained_model_name_or_path_or_dict": lora.source}
        try:
            state = cls.lora_state_dict(**where)
            state = state[0] if isinstance(state, tuple) else state  # some loaders add the network alphas
            encoders = [k for k in state if k.startswith("text_encoder")]
            if encoders:
                raise UserError(f"--lora {lora.source}: holds text-encoder LoRA layers (first: {encoders[0]}); "
                                "sample.py applies a LoRA's transformer part only: load it with pipe.load_lora_weights "
                                "in your own script (docs/api.md)")
            absent = absent_modules(state, model)
            if absent is not None:
                first, count, of = absent
                what = f"--lora {lora.source}: {count} of {of} layers it adapts are not in this {type(model).__name__} "
                if count > of * MOST_ABSENT:
                    raise UserError(f"{what}(first: {first}): a LoRA of another model, which PEFT would apply where "
                                    "names match; give a LoRA trained on this model")
                logger.warning("%s(first: %s): the rest is applied, as diffusers applies it (a LoRA of a sibling "
                               "model, e.g. one with guidance layers on a model without them?)", what, first)
            pipe.load_lora_weights(**where, adapter_name=name)
            if name not in {a for names in pipe.get_list_adapters().values() for a in names}:  # nothing loaded
                raise UserError(f"--lora {lora.source}: holds no LoRA layers for the {recorded['class']} "
                                "transformer (diffusers' loader found none to load)")
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # not a LoRA, or one of another model
            detail = error_detail(e)
            raise UserError(f"--lora {lora.source}: cannot load it onto the {recorded['class']} transformer "
                            f"({detail})") from None
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    logger.info("LoRAs %s at weights %s", ", ".join(lora.source for lora in loras),
                ", ".join(f"{lora.scale:g}" for lora in loras))


def absent_modules(state, model, prefix="transformer."):
    """(first, count, of) for the modules a LoRA state dict in diffusers' form {"transformer.<module>.lora_A.weight":
    ...}, or PEFT's without the prefix when no key has it, adapts that `model` does not have; None when it has all of
    them (or the keys are of another form, which diffusers' loader converts or refuses itself)."""
    if not any(key.startswith(prefix) for key in state):
        prefix = ""
    adapted = sorted({key.removeprefix(prefix).split(part)[0] for key in state for part in LORA_WEIGHTS
                      if part in key and key.startswith(prefix)})
    names = {name for name, _ in model.named_modules()}
    absent = [name for name in adapted if name not in names]
    return (absent[0], len(absent), len(adapted)) if absent else None
