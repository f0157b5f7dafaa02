"""Quantization methods as objects: how each builds its quantized layers, and whether and how calibration trains them.

The interface is two calls. `build(model, include, seed)` replaces the selected Linears in place and returns them
by qualified name (the job's "codebooks" stage). `prepare(layers, fp_weights, moments)` is what calibration calls
when it reaches a group of layers (block-wise: one block at a time; joint and online: all at the start): the one
place that decides whether a layer trains soft (VQ4DiT: candidate sets and ratio logits) or hard (codebook-only),
and, given the layers' input moments ({name: E[x x^T]}, measured by the block-wise walk when the config is
output_aware), refits the k-means codebooks to those inputs before calibration trains them.
The authors' recipe is not a method: it is the vq4dit method with calibration settings (configs/recipes/).
"""
import dataclasses

import torch

from vq4dit.calib.shared import layer_owners
from vq4dit.utils import distributed
from vq4dit.vq.apply import quantize_linears, quantize_linears_rtn, share_hard_
from vq4dit.vq.residual import ResidualVQLinear
from vq4dit.vq.weighted_kmeans import gptvq

METHODS = {}  # name -> Method subclass


def register(cls):
    METHODS[cls.name] = cls
    return cls


class Method:
    """One quantization method, bound to the codebook config (jobs.config.CodebookConfig) it runs with."""

    name = "abstract"
    calibrated = False  # whether the job records a teacher and calibrates the layers `build` returns

    def __init__(self, codebooks, seed=0):
        self.codebooks, self.seed = codebooks, seed


    @property
    def candidates(self):
        """Candidate codewords per sub-vector while a layer is soft (1: the method never softens a layer)."""
        return 1

    def build(self, model, include, seed, progress=True, settings=None):
        """Replace the Linears of `model` that the regex `include` selects; returns {name: QuantLinear}. settings:
        {name: vq.allocate.Setting} of a --bits allocation (codebook methods only)."""
        raise NotImplementedError

    def prepare(self, layers, fp_weights, moments=None):
        """Make `layers` {name: layer} ready to train, given their FP weights {name: (out, in)} and, for an
        output-aware start, their input moments {name: (in, in)}; default: as built."""


@register
class RTN(Method):
    """Scalar round-to-nearest per output channel at `wbits` bits (vq/rtn.py), the baseline; no calibration."""

    name = "rtn"

    def build(self, model, include, seed, progress=True, settings=None):
        return quantize_linears_rtn(model, self.codebooks.wbits, include=include, progress=progress)


@register
class KMeans(Method):
    """k-means codebooks of the weights, every sub-vector at its nearest codeword; no calibration."""

    name = "kmeans"

    def build(self, model, include, seed, progress=True, settings=None):
        c, spec = self.codebooks, self.codebooks.spec(self.candidates)
        specs = {name: dataclasses.replace(spec, codebook_size=s.k, dim=s.d, stages=s.stages)
                 for name, s in (settings or {}).items()}
        # hard layers: a soft one holds about 11 bytes per sub-vector at n = 2 against 1; `prepare` softens later
        return quantize_linears(model, spec, include=include, split_qkv=c.split_qkv, seed=seed, progress=progress,
                                soft=False, specs=specs)


@register
class Codebook(KMeans):
    """PQF-style: k-means, then calibration of codebooks and biases with the nearest assignments fixed."""

    name = "codebook"
    calibrated = True

    def prepare(self, layers, fp_weights, moments=None):
        """Codebook-only calibration trains hard layers: every sub-vector keeps its nearest codeword (gptvq: its
        output-aware assignment)."""
        for layer in layers.values():
            layer.harden()
        if moments is not None:
            fit_layers_(layers, fp_weights, moments, self.seed)


@register
class VQ4DiT(KMeans):
    """VQ4DiT: k-means, then calibration of candidate ratios, codebooks and biases (docs/method.md "VQ4DiT")."""

    name = "vq4dit"
    calibrated = True

    @property
    def candidates(self):
        return self.codebooks.candidates

    def prepare(self, layers, fp_weights, moments=None):
        """Give each hard layer its candidate sets and ratio logits from its FP weight: exactly what quantizing it
        soft would have given (VQLinear.soften_), at the moment calibration needs them. With moments (gptvq), every
        layer is first refit to its inputs and its output-aware assignment stays candidate 0 and the argmax; a layer
        handed in soft is hardened first (before calibration its argmax is its nearest codeword, the hard start)."""
        if moments is not None:
            fit_layers_(layers, fp_weights, moments, self.seed)
        for name, layer in layers.items():
            if layer.is_hard:
                layer.soften_(fp_weights[name], self.candidates, self.codebooks.ratio_init, keep=moments is not None)


def fit_layers_(layers, fp_weights, moments, seed):
    """fit_outputs_ of each of `layers` {name: VQLinear} (hardened first) to its input moments. Under torchrun each
    process holds the moments of its share of the layers (calib/shared.py layer_owners), fits those and sends
    them to the others (vq.apply.share_hard_)."""
    owner = layer_owners(list(layers.values()))
    for (name, layer), r in zip(layers.items(), owner):
        layer.harden()
        if r == distributed.rank():
            fit_outputs_(layer, fp_weights[name], moments[name], seed)
    share_hard_(list(layers.values()), owner)


@torch.no_grad()
def fit_outputs_(layer, fp_weight, h_full, seed):
    """Refit a hard VQLinear to its inputs (vq.weighted_kmeans.gptvq from its k-means codebooks): each row group's
    codebook and assignments then minimise the output error tr(dW H dW^T), not the weight error. A
    ResidualVQLinear refits its stages in turn (its fit_outputs_)."""
    if isinstance(layer, ResidualVQLinear):
        layer.fit_outputs_(fp_weight, h_full, seed)
        return
    rows = fp_weight.detach().float().to(layer.codebook.device).reshape(layer.groups, -1, layer.in_features)
    h = h_full.to(layer.codebook.device)
    fits = [gptvq(rows[g], h, layer.codebook_size, layer.dim, seed=seed + g, start=layer.codebook[g])
            for g in range(layer.groups)]  # [(codebook (k, d), index (N/G,))]
    layer.assign_(torch.stack([c for c, _ in fits]), torch.cat([i for _, i in fits]).to(layer.indices.dtype))


def method_for(name, codebooks, seed=0):
    """The Method registered as `name`, bound to `codebooks` and the run's `seed`."""
    return METHODS[name](codebooks, seed)
