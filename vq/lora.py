"""LoRA on vector-quantized layers: a separate full-precision low-rank branch beside each VQ layer, through PEFT.

diffusers' `pipe.load_lora_weights(...)` (Flux, SD3), `transformer.add_adapter(config)` and PEFT's
`inject_adapter_in_model` all wrap each targeted layer in a PEFT LoRA layer picked by the base layer's type. PEFT
takes a type it does not know through a LoraConfig's custom-module mapping (`LoraConfig._register_custom_module`,
its experimental API for custom layers), but diffusers builds the LoraConfig itself from the LoRA file, so no
caller can register anything on it. `enable_peft_lora()` is the one hook: it wraps LoraConfig.__post_init__ so that
every LoraConfig made from then on maps VQLinear -> VQLoraLinear (installed once per process; the mapping matches
VQLinear only, so LoRAs on other models are untouched). vq4dit.load_transformer calls it.

VQLoraLinear is PEFT's lora.Linear with the VQ layer as its base: base(x) + B(A(dropout(x))) * scaling per active
adapter, the base decoding its weight in every forward as without LoRA. Adapters, set_adapters / set_scale /
scale_layer, disabling, deleting and unloading are PEFT's own code. Merging is refused: a VQ layer's weight is a
table of shared codewords, and adding B @ A to it is no longer a codebook lookup. DoRA and PEFT's other LoRA
variants read the base weight; they are refused by PEFT's own variant check (only plain LoRA is listed).
"""
import functools
import logging

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from utils.errors import UserError
from vq.layer import VQLinear

logger = logging.getLogger(__name__)

_HOOK_MARK = "_vq4dit_registers_vq_layers"


class VQLoraLinear(PeftLoraLinear):
    """A PEFT LoRA layer over a VQLinear; never merged into it (the LoRA stays a full-precision branch)."""

    @property
    def lora_variants(self):
        return {(): None}  # plain LoRA only: DoRA and the other variants need the base weight as a tensor

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # PEFT reads base_layer.weight.device / .dtype; a VQLinear's weight is its decoding method. Its codebook
        # holds the layer's device and compute dtype (the LoRA matrices are cast to it, as over an nn.Linear).
        return base_layer.codebook.device, base_layer.codebook.dtype

    def merge(self, safe_merge=False, adapter_names=None):
        base = self.get_base_layer()
        raise UserError(f"fuse_lora/merge: cannot fuse a LoRA into a vector-quantized layer ({base.extra_repr()}): "
                        "its weight is a lookup of shared codewords; keep the LoRA as its separate branch (do not "
                        "call fuse_lora; set_adapters sets its weight)")


CUSTOM_LAYERS = {VQLinear: VQLoraLinear}


def enable_peft_lora():
    """Make every LoraConfig created from now on wrap VQLinear layers in VQLoraLinear; idempotent.

    Call it before building a LoraConfig or loading a LoRA onto a quantized model (vq4dit.load_transformer does).
    """
    post_init = LoraConfig.__post_init__
    if getattr(post_init, _HOOK_MARK, False):
        return

    @functools.wraps(post_init)
    def registering(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        self._register_custom_module(CUSTOM_LAYERS)

    setattr(registering, _HOOK_MARK, True)
    LoraConfig.__post_init__ = registering
    logger.debug("PEFT LoraConfig now maps VQLinear to VQLoraLinear")
