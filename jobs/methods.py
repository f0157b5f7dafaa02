"""Quantization methods as objects: how each builds its quantized layers, and whether and how calibration trains them.

The interface is two calls. `build(model, include, seed)` replaces the selected Linears in place and returns them
by qualified name (the job's "codebooks" stage). `prepare(layers, fp_weights)` is what calibration calls when it
reaches a group of layers (block-wise: one block at a time; joint and online: all at the start): the one place that
decides whether a layer trains soft (VQ4DiT: candidate sets and ratio logits) or hard (codebook-only).
The authors' recipe is not a method: it is the vq4dit method with calibration settings (configs/recipes/).
"""
from vq.apply import quantize_linears, quantize_linears_rtn

METHODS = {}  # name -> Method subclass


def register(cls):
    METHODS[cls.name] = cls
    return cls


class Method:
    """One quantization method, bound to the codebook config (jobs.config.CodebookConfig) it runs with."""

    name = "abstract"
    calibrated = False  # whether the job records a teacher and calibrates the layers `build` returns

    def __init__(self, codebooks):
        self.codebooks = codebooks

    @property
    def candidates(self):
        """Candidate codewords per sub-vector while a layer is soft (1: the method never softens a layer)."""
        return 1

    def build(self, model, include, seed, progress=True):
        """Replace the Linears of `model` that the regex `include` selects; returns {name: QuantLinear}."""
        raise NotImplementedError

    def prepare(self, layers, fp_weights):
        """Make `layers` {name: layer} ready to train, given their FP weights {name: (out, in)}; default: as built."""


@register
class RTN(Method):
    """Scalar round-to-nearest per output channel at `wbits` bits (vq/rtn.py), the baseline; no calibration."""

    name = "rtn"

    def build(self, model, include, seed, progress=True):
        return quantize_linears_rtn(model, self.codebooks.wbits, include=include, progress=progress)


@register
class KMeans(Method):
    """k-means codebooks of the weights, every sub-vector at its nearest codeword; no calibration."""

    name = "kmeans"

    def build(self, model, include, seed, progress=True):
        c = self.codebooks
        # hard layers: a soft one holds about 11 bytes per sub-vector at n = 2 against 1; `prepare` softens later
        return quantize_linears(model, c.k, c.dim, candidates=self.candidates, include=include,
                                split_qkv=c.split_qkv, kmeans_iters=c.kmeans_iters, seed=seed,
                                ratio_init=c.ratio_init, kmeans_init=c.kmeans_init, soft=False, progress=progress)


@register
class Codebook(KMeans):
    """PQF-style: k-means, then calibration of codebooks and biases with the nearest assignments fixed."""

    name = "codebook"
    calibrated = True

    def prepare(self, layers, fp_weights):
        """Codebook-only calibration trains hard layers: every sub-vector keeps its nearest codeword."""
        for layer in layers.values():
            layer.harden()


@register
class VQ4DiT(KMeans):
    """VQ4DiT: k-means, then calibration of candidate ratios, codebooks and biases (METHOD.md section 3)."""

    name = "vq4dit"
    calibrated = True

    @property
    def candidates(self):
        return self.codebooks.candidates

    def prepare(self, layers, fp_weights):
        """Give each hard layer its candidate sets and ratio logits from its FP weight: exactly what quantizing it
        soft would have given (VQLinear.soften_), at the moment calibration needs them."""
        for name, layer in layers.items():
            if layer.is_hard:
                layer.soften_(fp_weights[name], self.candidates, self.codebooks.ratio_init)


def method_for(name, codebooks):
    """The Method registered as `name`, bound to `codebooks`."""
    return METHODS[name](codebooks)
