"""Load a quantized artifact (a directory or a hub repo) as the transformer of a user's own diffusers pipeline."""
import logging

import torch

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
    enable_peft_lora()
    model, ref, _ = load_quantized(resolve_artifact(path_or_hub_id, revision), device)
    if dtype is not None:
        model.to(dtype)  # floating parameters and buffers only: indices stay uint8/int16/int32
    logger.info("loaded quantized %s from %s", ref["class"], path_or_hub_id)
    return model
