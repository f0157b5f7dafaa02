"""LoRA on vector-quantized layers: a separate full-precision low-rank branch beside each VQ layer, through PEFT.

diffusers' `pipe.load_lora_weights(...)` (Flux, SD3), `transformer.add_adapter(config)` and PEFT's
`inject_adapter_in_model` all wrap each targeted layer in a PEFT LoRA layer picked by the base layer's type. PEFT
takes a type it does not know through a LoraConfig's custom-module mapping (`LoraConfig._register_custom_module`,
its experimental API for custom layers), but diffusers builds the LoraConfig itself from the LoRA file, so no
caller can register anything on it. `enable_peft_lora()` is the one hook: it wraps LoraConfig.__post_init__ so that
every LoraConfig made from then on maps VQLinear -> VQLoraLinear (installed once per process; the mapping matches
VQLinear only, so LoRAs on other models are untouched). It also lets diffusers' Flux LoRA loader pass VQ layers:
before loading, FluxLoraLoaderMixin reads every target's `weight` from the transformer's state dict to zero-pad
LoRAs for Flux Control's widened input layer; a VQ layer has no weight tensor (and is never widened), so its LoRA
entries skip that step (PEFT checks their shapes when it loads them). vq4dit.load_transformer calls it.

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


def _targets_vq_layer(transformer, key, prefix):
    """Whether the LoRA state-dict entry `key` ("<prefix><module>.lora_A.weight", ...) belongs to a VQ layer (bare,
    or already wrapped by an earlier LoRA)."""
    try:
        module = transformer.get_submodule(key.removeprefix(prefix).split(".lora_")[0])
    except AttributeError:  # a module the transformer lacks: diffusers' own step reports and ignores it
        return False
    return isinstance(module, VQLinear) or isinstance(getattr(module, "base_layer", None), VQLinear)


def _register_vq_layers(post_init):
    @functools.wraps(post_init)
    def registering(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        self._register_custom_module(CUSTOM_LAYERS)

    return registering


def _skip_vq_layers(expand):
    """FluxLoraLoaderMixin._maybe_expand_lora_state_dict (its function) run on the entries of non-VQ layers only."""
    @functools.wraps(expand)
    def skipping(cls, transformer, lora_state_dict):
        prefix = f"{cls.transformer_name}."
        vq = {k for k in lora_state_dict if k.startswith(prefix) and _targets_vq_layer(transformer, k, prefix)}
        rest = expand(cls, transformer, {k: v for k, v in lora_state_dict.items() if k not in vq})
        return {**{k: lora_state_dict[k] for k in vq}, **rest}

    return skipping


def enable_peft_lora():
    """Make every LoraConfig created from now on wrap VQLinear layers in VQLoraLinear, and diffusers' Flux LoRA
    loader accept VQ layers; idempotent. Call it before building a LoraConfig or loading a LoRA onto a quantized
    model (vq4dit.load_transformer does)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    if getattr(LoraConfig.__post_init__, _HOOK_MARK, False):
        return
    registering = _register_vq_layers(LoraConfig.__post_init__)
    skipping = _skip_vq_layers(FluxLoraLoaderMixin.__dict__["_maybe_expand_lora_state_dict"].__func__)
    for hook in (registering, skipping):
        setattr(hook, _HOOK_MARK, True)
    LoraConfig.__post_init__ = registering
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(skipping)
    logger.debug("PEFT LoraConfig maps VQLinear to VQLoraLinear; Flux LoRA loading skips VQ layers' weight shapes")
