"""LoRA on quantized layers (VQ, RTN): a separate full-precision low-rank branch beside each one, through PEFT.

diffusers' `pipe.load_lora_weights(...)` (Flux, SD3), `transformer.add_adapter(config)` and PEFT's
`inject_adapter_in_model` all wrap each targeted layer in a PEFT LoRA layer picked by the base layer's type. PEFT
takes a type it does not know through a LoraConfig's custom-module mapping (`LoraConfig._register_custom_module`,
its experimental API for custom layers), but diffusers builds the LoraConfig itself from the LoRA file, so no
caller can register anything on it. `enable_peft_lora()` is the one hook: it wraps LoraConfig.__post_init__ so that
every LoraConfig made from then on maps QuantLinear (vq/qlinear.py: VQLinear, RTNLinear) -> QuantLoraLinear
(installed once per process; the mapping matches quantized layers only, so LoRAs on other models are untouched). It
also lets diffusers' Flux LoRA loader pass quantized layers: before loading, FluxLoraLoaderMixin reads every
target's `weight` from the transformer's state dict to zero-pad LoRAs for Flux Control's widened input layer; a
quantized layer has no weight tensor (and is never widened), so its LoRA entries skip that step (PEFT checks their
shapes when it loads them). vq4dit.load_transformer calls it.

QuantLoraLinear is PEFT's lora.Linear with the quantized layer as its base: base(x) + B(A(dropout(x))) * scaling
per active adapter, the base decoding its weight in every forward as without LoRA. Adapters, set_adapters /
set_scale / scale_layer, disabling, deleting and unloading are PEFT's own code. Merging is refused: a VQ layer's
weight is a table of shared codewords (an RTN layer's a grid of integer codes), and adding B @ A to it leaves that
form. DoRA and PEFT's other LoRA variants read the base weight; they are refused by PEFT's own variant check (only
plain LoRA is listed).
"""
import functools
import logging

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from vq4dit.utils.errors import UserError
from vq4dit.vq.qlinear import QuantLinear

logger = logging.getLogger(__name__)

_HOOK_MARK = "_vq4dit_registers_vq_layers"


class QuantLoraLinear(PeftLoraLinear):
    """A PEFT LoRA layer over a QuantLinear; never merged into it (the LoRA stays a full-precision branch)."""

    @property
    def lora_variants(self):
        return {(): None}  # plain LoRA only: DoRA and the other variants need the base weight as a tensor

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:  # PEFT's "Invalid or unsupported variant combination: ('use_dora',)"
            base = self.get_base_layer()
            raise UserError(f"{e}: LoRA variants (DoRA, ...) read the base layer's weight as a tensor, and this "
                            f"{type(base).__name__} ({base.extra_repr()}) stores it encoded; use plain LoRA "
                            "(use_dora=False)") from None

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # PEFT reads base_layer.weight.device / .dtype; a QuantLinear's weight is its decoding method. Its stored
        # weight (qweight) holds the device, its floating tensors (codebook, scales, bias) the compute dtype the
        # LoRA matrices are cast to, as over an nn.Linear.
        dtype = next(t.dtype for t in (*base_layer.parameters(), *base_layer.buffers()) if t.is_floating_point())
        return base_layer.qweight.device, dtype

    def merge(self, safe_merge=False, adapter_names=None):
        base = self.get_base_layer()
        raise UserError(f"fuse_lora/merge: cannot fuse a LoRA into a quantized layer ({type(base).__name__} "
                        f"{base.extra_repr()}): its weight is stored encoded (shared codewords, integer codes); keep "
                        "the LoRA as its separate branch (do not call fuse_lora; set_adapters sets its weight)")


CUSTOM_LAYERS = {QuantLinear: QuantLoraLinear}  # PEFT matches by isinstance: VQLinear, RTNLinear


def _targets_quantized_layer(transformer, key, prefix):
    """Whether the LoRA state-dict entry `key` ("<prefix><module>.lora_A.weight", ...) belongs to a quantized layer
    (bare, or already wrapped by an earlier LoRA)."""
    try:
        module = transformer.get_submodule(key.removeprefix(prefix).split(".lora_")[0])
    except AttributeError:  # a module the transformer lacks: diffusers' own step reports and ignores it
        return False
    return isinstance(module, QuantLinear) or isinstance(getattr(module, "base_layer", None), QuantLinear)


def _register_quantized_layers(post_init):
    @functools.wraps(post_init)
    def registering(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        self._register_custom_module(CUSTOM_LAYERS)

    return registering


def _skip_quantized_layers(expand):
    """FluxLoraLoaderMixin._maybe_expand_lora_state_dict (its function) run on the entries of full-precision layers
    only."""
    @functools.wraps(expand)
    def skipping(cls, transformer, lora_state_dict):
        prefix = f"{cls.transformer_name}."
        quantized = {k for k in lora_state_dict
                     if k.startswith(prefix) and _targets_quantized_layer(transformer, k, prefix)}
        rest = expand(cls, transformer, {k: v for k, v in lora_state_dict.items() if k not in quantized})
        return {**{k: lora_state_dict[k] for k in quantized}, **rest}

    return skipping


def enable_peft_lora():
    """Make every LoraConfig created from now on wrap quantized layers in QuantLoraLinear, and diffusers' Flux LoRA
    loader accept them; idempotent. Call it before building a LoraConfig or loading a LoRA onto a quantized model
    (vq4dit.load_transformer does)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    if getattr(LoraConfig.__post_init__, _HOOK_MARK, False):
        return
    registering = _register_quantized_layers(LoraConfig.__post_init__)
    skipping = _skip_quantized_layers(FluxLoraLoaderMixin.__dict__["_maybe_expand_lora_state_dict"].__func__)
    for hook in (registering, skipping):
        setattr(hook, _HOOK_MARK, True)
    LoraConfig.__post_init__ = registering
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(skipping)
    logger.debug("PEFT LoraConfig maps QuantLinear to QuantLoraLinear; Flux LoRA loading skips quantized layers' "
                 "weight shapes")
