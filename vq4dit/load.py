"""Load a quantized artifact (a directory or a hub repo) as the transformer of a user's own diffusers pipeline."""
import functools
import logging
import os
from pathlib import Path

import torch

from vq4dit.utils.device import resolve_device
from vq4dit.utils.errors import UserError
from vq4dit.vq.artifact import load_quantized, resolve_artifact
from vq4dit.vq.lora import enable_peft_lora

logger = logging.getLogger(__name__)


def load_transformer(path_or_hub_id, device="cpu", dtype=None, revision=None):
    """The quantized transformer of an artifact, in eval mode on `device`, ready for
    `SomePipeline.from_pretrained(base, transformer=model)` or a pipeline built in memory.

    path_or_hub_id: an artifact directory written by quantize.py (or save_quantized), or a hub repo id "owner/name"
        holding one; a hub repo goes through huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only, no
        network) at `revision` (default main). Either way the sha256 digests of quant_config.json's content and of
        model.safetensors are checked before anything is built.
    dtype: the compute dtype (e.g. torch.bfloat16) of codebooks, biases and full-precision layers; codeword indices
        keep their integer dtype. None keeps float32, as stored.
    It also enables LoRA on the quantized layers (vq.lora.enable_peft_lora), so that pipe.load_lora_weights and
    PEFT's LoraConfig work on the returned model.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(f"load_transformer: dtype={dtype!r}; give a floating torch.dtype (torch.bfloat16, ...) or None")
    device = resolve_device(device, "load_transformer: device")  # before the artifact is read, which it would blame
    enable_peft_lora()
    model, ref, _ = load_quantized(resolve_artifact(path_or_hub_id, revision), device)
    if dtype is not None:
        model.to(dtype)  # floating parameters and buffers only: indices stay uint8/int16/int32
    guard_save_pretrained(model)
    logger.info("loaded quantized %s from %s", ref["class"], path_or_hub_id)
    return model


def guard_save_pretrained(model):
    """Make diffusers' save_pretrained of the quantized `model` (alone, or as a pipeline's component, which
    pipe.save_pretrained calls) a one-line UserError: diffusers' format has no quantized layers, and what it wrote
    reloaded as NaN latents with the weights left on the meta device."""
    model.save_pretrained = functools.partial(_refuse_save_pretrained, type(model).__name__)


def guard_pipeline_save(pipe, model):
    """Make pipe.save_pretrained refuse, before it writes anything, while the quantized `model` (or a torch.compile
    of it) is pipe.transformer (its own guard refuses only when the pipeline reaches it, after the components saved
    before it: VAE, text encoders); with pipe.transformer = None it saves the rest. A module-level function, not a
    closure: the pipeline still pickles and deep-copies."""
    pipe.save_pretrained = functools.partial(_save_unless_quantized, pipe, model)


def _save_unless_quantized(pipe, model, save_directory=None, *args, **kwargs):
    current = getattr(pipe, "transformer", None)
    if getattr(current, "_orig_mod", current) is model:
        _refuse_save_pretrained(type(model).__name__, os.path.join(str(save_directory), "transformer"), whole=True)
    return type(pipe).save_pretrained(pipe, save_directory, *args, **kwargs)


def _refuse_save_pretrained(name, save_directory=None, *args, whole=False, **kwargs):
    left, path = "", Path(str(save_directory))
    saved = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and p.name != "transformer") \
        if path.name == "transformer" and path.parent.is_dir() and not whole else []
    if saved:  # called by a pipeline's save_pretrained, which saves its components in turn
        left = f"; pipe.save_pretrained had saved {', '.join(saved)} into {path.parent} already"
    raise UserError(f"{name}.save_pretrained({str(save_directory)!r}): a quantized transformer is not saved in "
                    "diffusers' format (it would reload as NaN); save the artifact with quantized.save(DIR) (the "
                    "QuantizedTransformer of quantize_transformer) and load it with vq4dit.load_transformer(DIR); "
                    f"for the rest of the pipeline, set pipe.transformer = None before pipe.save_pretrained{left}")
