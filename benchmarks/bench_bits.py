"""Artifact sizes at 1, 1.5 and 2 index bits per weight for DiT-XL/2, Flux-dev and Qwen-Image, from the codecs.

Every model is built on the meta device from its published config (no weights). For each budget: the uniform
settings of that many bits exactly, from the codecs' tensor specs: one codebook (k256 d8, k64 d4, k256 d4; k4096 d8
at 1.5), and two residual stages of d 8 (k16, k64, k256 x2: the ResidualVQLinear codec); and an
allocated artifact's size at that budget: indices at most budget x weights, codebooks at most those of the largest
setting of the default --bits-settings, biases as stored. The rest of the model (embedders, norms, final layer)
as the artifact stores it, in fp32. GB = 1e9 bytes.

    python benchmarks/bench_bits.py   # writes benchmarks/results/bits_sizes.md
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq4dit.jobs.allocation import selected_linears, setting_bytes  # noqa: E402
from vq4dit.jobs.plan_sources import REFERENCE_MODELS, meta_model  # noqa: E402
from vq4dit.models.adapters import ADAPTERS  # noqa: E402
from vq4dit.models.adapters.generic import GenericAdapter  # noqa: E402
from vq4dit.models.loading import DiTSpec  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq.allocate import DEFAULT_SETTINGS, Setting, parse_settings  # noqa: E402
from vq4dit.vq.layer import CODEBOOK_STORAGE_BITS  # noqa: E402

UNIFORM = {1.0: (Setting(256, 8), Setting(16, 8, 2)), 1.5: (Setting(64, 4), Setting(4096, 8), Setting(64, 8, 2)),
           2.0: (Setting(256, 4), Setting(256, 8, 2))}


def models():
    """[(label, model on meta, regex of the Linears quantized)]."""
    with torch.device("meta"):
        dit = DiTSpec("DiT-XL/2", 32, 1000, 4).build()
    flux = meta_model(*REFERENCE_MODELS["black-forest-labs/FLUX.1-dev"])
    qwen = meta_model("QwenImageTransformer2DModel", {})  # the class defaults are Qwen-Image's config
    return [("DiT-XL/2", dit, ADAPTERS["DiT"]().quant_include(dit)),
            ("Flux-dev", flux, ADAPTERS["FluxTransformer2DModel"]().quant_include(flux)),
            ("Qwen-Image (generic adapter)", qwen, GenericAdapter().quant_include(qwen))]


def largest_codebooks():
    """(bytes, setting) of the largest fp16 codebooks (all stages) a layer gets under the default --bits-settings."""
    largest = max(parse_settings(DEFAULT_SETTINGS), key=lambda s: s.stages * s.k * s.d)
    return largest.stages * largest.k * largest.d * CODEBOOK_STORAGE_BITS // 8, largest


def rows(label, model, include):
    linears = selected_linears(model, include)
    groups = dict.fromkeys(linears, 1)
    prefixes = tuple(f"{name}." for name in linears)
    rest = sum(t.numel() * 4 for k, t in model.state_dict().items() if not k.startswith(prefixes))
    weights = sum(m.in_features * m.out_features for m in linears.values())
    biases = sum(m.out_features * 4 for m in linears.values() if m.bias is not None)
    fp16 = sum(t.numel() * 2 for t in model.state_dict().values())
    codebooks = len(linears) * largest_codebooks()[0]
    out = []
    for bits, settings in UNIFORM.items():
        uniform = ", ".join(f"{(rest + setting_bytes(linears, groups, s)) / 1e9:.3f} ({s})" for s in settings)
        allocated = bits * weights / 8 + codebooks + biases
        out.append(f"| {label} | {len(linears)} | {weights / 1e9:.3f} | {fp16 / 1e9:.2f} | {bits:g} "
                   f"| {uniform} | <= {(rest + allocated) / 1e9:.3f} | {rest / 1e9:.3f} |")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "bits_sizes.md"))
    args = p.parse_args()
    lines = ["# Artifact sizes at 1, 1.5 and 2 bits per weight", "", "Command: `python benchmarks/bench_bits.py`",
             "", "| model | quantized Linears | their weights (B) | bf16 model GB | index bits | uniform artifact GB "
             "(setting; x2: two residual stages) | allocated artifact GB (default settings) "
             "| of which unquantized, fp32 GB |",
             "|---|---|---|---|---|---|---|---|"]
    for label, model, include in models():
        lines += rows(label, model, include)
    nbytes, largest = largest_codebooks()
    lines += ["", "Allocated: indices at most the budget, codebooks at most the fp16 codebooks of the largest "
              f"default setting per layer ({largest}: {nbytes / 1024:g} KiB), biases fp32. The unquantized rest "
              "(embedders, norms, final layer, position tables) is stored in fp32 as every artifact here stores it."]
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
