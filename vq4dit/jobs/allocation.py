"""--bits B: every quantized layer gets one codebook setting (k, d) so that the average index bits per weight stay
within B and the estimated prediction error is least.

The estimate (HIGGS-style) is sum over layers of a_l t_l^2: t_l^2 the layer's relative weight error at a setting,
measured by fitting its k-means codebook at that setting (ESTIMATE_ITERS Lloyd iterations), and a_l the model's
sensitivity to that layer (calib/sensitivity.py: noise probes of the full-precision model on a few teacher calls).
The choice is a multiple-choice knapsack solved exactly by vq/allocate.py. The chosen settings then go to the
method's build as per-layer codebook specs, so the rest of the run (k-means, calibration, save) is unchanged.
"""
import contextlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.calib.sensitivity import block_sensitivities, linears_by_block, noise_sensitivities, probe_calls
from vq4dit.utils.device import model_device
from vq4dit.utils.errors import UserError
from vq4dit.vq.allocate import Option, parse_settings, solve
from vq4dit.vq.apply import QKV_PATTERN, layer_seed
from vq4dit.vq.layer import CodebookSpec
from vq4dit.vq.residual import layer_class

logger = logging.getLogger(__name__)

ESTIMATE_ITERS = 25  # Lloyd iterations (at most the run's) of the k-means fits that measure a setting's weight error


@dataclass(frozen=True)
class LayerChoice:
    """The setting one layer got, its number of weights, its relative weight error t^2 there and its sensitivity."""

    setting: object  # vq.allocate.Setting
    weights: int
    weight_error: float
    sensitivity: float

    @property
    def estimate(self):
        return self.sensitivity * self.weight_error


@dataclass(frozen=True)
class Allocation:
    """The allocation of a budget of `budget` index bits per weight: {layer name: LayerChoice}, in module order."""

    budget: float
    layers: dict

    @property
    def settings(self):
        return {name: c.setting for name, c in self.layers.items()}

    @property
    def bits(self):
        """Index bits per weight over all allocated layers."""
        weights = sum(c.weights for c in self.layers.values())
        return sum(c.setting.bits * c.weights for c in self.layers.values()) / weights

    @property
    def estimate(self):
        """Estimated relative prediction MSE of the k-means layers (sum of a_l t_l^2)."""
        return sum(c.estimate for c in self.layers.values())

    def summary(self):
        """One line: the budget, the bits spent, and how many layers got each setting."""
        counts = Counter(c.setting for c in self.layers.values())
        parts = ", ".join(f"{n} x {s} ({s.bits:.3g} bits)" for s, n in sorted(counts.items(), key=lambda i: i[0].bits))
        return (f"bit allocation: budget {self.budget:g}, spent {self.bits:.4f} index bits per weight over "
                f"{len(self.layers)} layers: {parts}; estimated relative prediction MSE {self.estimate:.3g}")

    def lines(self):
        """One line per layer: its setting, weight error, sensitivity and estimated share of the error."""
        return [f"  {name}: {c.setting} ({c.setting.bits:.3g} bits), weight error t^2 {c.weight_error:.3g}, "
                f"sensitivity {c.sensitivity:.3g}, estimate {c.estimate:.3g}" for name, c in self.layers.items()]


def selected_linears(model, include):
    """{name: nn.Linear} of `model` whose qualified names match the regex `include`, in module order."""
    pattern = re.compile(include)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)}


def fits(linear, setting, groups):
    """Whether a Linear can be cut into d-sub-vectors with at least k of them per codebook."""
    return linear.in_features % setting.d == 0 and linear.out_features * linear.in_features // setting.d // groups \
        >= setting.k


def check_fits(name, linear, groups, settings_text):
    """A UserError when no setting of --bits-settings `settings_text` fits Linear `linear` (named `name`, its weight
    cut into `groups` codebooks), as `fits` says: the run refuses it before any probe, and --dry-run with it."""
    if not any(fits(linear, s, groups) for s in parse_settings(settings_text)):
        raise UserError(f"--bits-settings {settings_text}: no setting fits layer {name} (in_features "
                        f"{linear.in_features}, {linear.out_features * linear.in_features} weights): d must divide "
                        "in_features and k be at most the number of sub-vectors")


@dataclass(frozen=True)
class WeightFit:
    """How weight_errors fits a setting's k-means codebook: `iters` Lloyd iterations from `kmeans_init`."""

    iters: int = ESTIMATE_ITERS
    kmeans_init: str = "fast"


@torch.no_grad()
def weight_errors(linears, settings, groups, seed, fit=WeightFit(), progress=False):
    """{name: {Setting: t^2}}: the relative squared weight error ||W - Q(W)||^2 / ||W||^2 of each Linear's k-means
    codebook at each setting that fits it (from the layer's seed, as the build fits it, as WeightFit `fit` says)."""
    out = {}
    for name, linear in linears.items():
        w = linear.weight.detach().float()  # (out, in)
        norm = w.pow(2).sum().clamp_min(1e-30)
        out[name] = {}
        for s in settings:
            if not fits(linear, s, groups[name]):
                continue
            spec = CodebookSpec(s.k, s.d, candidates=1, kmeans_iters=fit.iters, kmeans_init=fit.kmeans_init,
                                stages=s.stages)
            layer = layer_class(spec).from_linear(linear, spec, groups=groups[name], seed=layer_seed(seed, name),
                                                  name=name, soft=False)
            out[name][s] = ((layer.weight().float() - w).pow(2).sum() / norm).item()
        if progress:
            logger.info("weight errors of %s: %s", name, ", ".join(f"{s} {e:.3g}" for s, e in out[name].items()))
    return out


def choose(errors, sensitivities, weights, budget):
    """{name: Setting} minimising sum a_l t_l^2 with sum (bits x weights) <= budget x total weights, or None when the
    cheapest settings exceed it. errors {name: {Setting: t^2}}, sensitivities {name: a_l}, weights {name: count}."""
    names = list(errors)
    options = [[Option(weights[n] * s.bits, sensitivities[n] * e) for s, e in errors[n].items()] for n in names]
    options = [[Option(round(o.cost), o.error) for o in layer] for layer in options]  # integer: d divides in
    picks = solve(options, int(budget * sum(weights.values())))
    if picks is None:
        return None
    return {n: list(errors[n])[j] for n, j in zip(names, picks, strict=True)}


def allocate(model, adapter, include, config, offload=None, progress=True):
    """The Allocation of QuantizeConfig `config`'s --bits over the Linears of the full-precision `model` (left
    unchanged) that `include` selects, with models.adapters.Adapter `adapter`'s teacher for the probes. offload:
    the models.offload.HostBlocks streaming `model` through the device (None: it is on its device); each block's
    weight errors are then measured while it is resident, and the sensitivities must be --bits-probe block's."""
    c = config.codebooks
    settings = parse_settings(c.settings_text)
    linears = selected_linears(model, include)
    qkv = re.compile(QKV_PATTERN)
    groups = {name: 3 if c.split_qkv and qkv.search(name) else 1 for name in linears}
    for name, linear in linears.items():
        check_fits(name, linear, groups[name], c.settings_text)
    warning = over_budget(c)
    if warning is not None:
        logger.warning("%s", warning)
    errors, fit = {}, WeightFit(min(ESTIMATE_ITERS, c.kmeans_iters), c.kmeans_init)
    for block, names in linears_by_block(adapter.blocks(model), linears):
        with offload.resident(block) if offload is not None and block is not None else contextlib.nullcontext():
            errors.update(weight_errors({n: linears[n] for n in names}, settings, groups, config.seed, fit, progress))
    errors = {n: errors[n] for n in linears}
    probes = probe_calls(model, adapter, config.teacher, config.seed, model_device(model))
    sensitivities = {}
    if c.bits_probe == "block":
        sensitivities = block_sensitivities(probes, list(linears), config.seed, offload, progress)
    rest = [n for n in linears if n not in sensitivities]  # "model", or the Linears outside the blocks
    if rest:
        sensitivities.update(noise_sensitivities(probes, rest, seed=config.seed, progress=progress))
    sensitivities = {n: sensitivities[n] for n in linears}
    weights = {name: m.in_features * m.out_features for name, m in linears.items()}
    chosen = choose(errors, sensitivities, weights, c.bits)
    if chosen is None:
        least = sum(min(s.bits for s in errors[n]) * weights[n] for n in linears) / sum(weights.values())
        raise UserError(f"invalid bits={c.bits!r}: the settings that fit these layers need at least {least:.4f} "
                        "index bits per weight")
    allocation = Allocation(c.bits, {n: LayerChoice(s, weights[n], errors[n][s], sensitivities[n])
                                     for n, s in chosen.items()})
    logger.info("%s", allocation.summary())
    for line in allocation.lines():
        logger.info("%s", line)
    return allocation


def meta_linears(spec):
    """{name: nn.Linear on meta} that ModelSpec `spec` would quantize, read from the model's shapes alone (a DiT of
    the registry, or a text-to-image pipeline jobs.memory_plan knows); None for a model known only once loaded."""
    from vq4dit.jobs.memory_plan import meta_model, plan_source
    from vq4dit.models.adapters import ADAPTERS
    from vq4dit.models.adapters.base import linear_pattern
    from vq4dit.models.dit import DiT_models
    from vq4dit.models.loading import DiTSpec

    source = plan_source(spec.ckpt)
    if source is not None and source[0] in ADAPTERS:
        model = meta_model(source[0], source[1])
        default = ADAPTERS[source[0]]().quant_include(model)
    elif source is None and spec.model in DiT_models:
        with torch.device("meta"):
            model = DiTSpec(spec.model, 32, 10, 4).build()  # block Linears do not depend on size or classes
        default = ADAPTERS["DiT"]().quant_include(model)
    else:
        return None
    return selected_linears(model, linear_pattern(default, spec.include, spec.exclude))


def setting_bytes(linears, groups, setting):
    """Stored bytes (indices, codebooks, biases: the tensor specs of the VQLinear codec, or of the ResidualVQLinear
    codec for a setting of several stages) of the Linears {name: nn.Linear} with {name: codebook groups} all at
    `setting`, or None when it does not fit every one of them."""
    from vq4dit.vq.codecs import CODECS

    if not all(fits(m, setting, groups[n]) for n, m in linears.items()):
        return None
    codec, stages = (CODECS["ResidualVQLinear"], {"stages": setting.stages}) if setting.stages > 1 else \
        (CODECS["VQLinear"], {})
    metas = [{"in_features": m.in_features, "out_features": m.out_features, "k": setting.k, "d": setting.d, "n": 1,
              "groups": groups[n], "bias": m.bias is not None, **stages} for n, m in linears.items()]
    return sum(math.prod(shape) * dtype.itemsize for meta in metas
               for shape, dtype in codec.tensor_specs(meta).values())


def over_budget(codebooks):
    """The warning for a --bits budget above every setting of --bits-settings (CodebookConfig `codebooks`), None
    when some setting spends it: each layer then takes its most bits, and the budget is not what the run spends."""
    top = max(parse_settings(codebooks.settings_text), key=lambda s: s.bits)
    if codebooks.bits <= top.bits:
        return None
    return (f"--bits {codebooks.bits:g}: above the {top.bits:g} bits per weight of the largest setting of "
            f"--bits-settings {codebooks.settings_text} ({top}); every layer gets one of its largest settings")


def budget_text(config):
    """--dry-run's lines for a --bits run: the quantized weights, the index bytes the budget allows and the codebook
    bytes, next to each setting's size were it given to every layer (from the VQLinear codec's tensor specs)."""
    from vq4dit.vq.layer import CODEBOOK_STORAGE_BITS

    c = config.codebooks
    linears = meta_linears(config.model)
    if linears is None:
        return f"--bits {c.bits:g}: sizes are shown once the model is loaded"
    settings = parse_settings(c.settings_text)
    qkv = re.compile(QKV_PATTERN)
    groups = {name: 3 if c.split_qkv and qkv.search(name) else 1 for name in linears}
    weights = sum(m.in_features * m.out_features for m in linears.values())

    codebooks = [sum(groups.values()) * s.stages * s.k * s.d * CODEBOOK_STORAGE_BITS / 8 for s in settings]
    index = size_text(c.bits * weights / 8)
    lines = [f"--bits {c.bits:g}: index bits at most {c.bits:g} x {weights:,} weights = {index} over {len(linears)} "
             f"Linears, codebooks {size_text(min(codebooks))} to {size_text(max(codebooks))} (fp16), biases as stored; "
             "each setting on every layer, for comparison (indices, codebooks, biases):"]
    for s in settings:
        size = setting_bytes(linears, groups, s)
        lines.append(f"  {s} ({s.bits:.3g} bits): " + (size_text(size) if size is not None else
                                                        "does not fit every layer"))
    warning = over_budget(c)
    return "\n".join(lines + ([f"warning: {warning}"] if warning is not None else []))


def size_text(nbytes):
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"
