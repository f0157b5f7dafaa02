"""Model-size report: DiT-XL/2 transformer blocks at W2 / W3 (analytic, from the artifact codecs) next to the
paper's figures, and real artifact sizes on disk for the digits model.

Sizes of DiT-XL/2 come from `tensor_specs` of the same codec that writes artifacts (vq/codecs.py), applied to
hard VQLinear skeletons on the meta device, so no 675M-parameter model is materialised. MB = 2^20 bytes, the
unit of the paper's figures (2553.35 MB = 669,344,256 fp32 parameters).

    python benchmarks/size_report.py   # writes benchmarks/results/size_report.md
"""
import argparse
import math
import os
import re
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq4dit.models.digits import IMAGE_SIZE, NUM_CLASSES  # noqa: E402
from vq4dit.models.loading import DiTSpec, save_dit  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq.apply import BLOCK_LINEARS, quantize_linears  # noqa: E402
from vq4dit.vq.artifact import DTYPES, save_quantized  # noqa: E402
from vq4dit.vq.codecs import CODECS  # noqa: E402
from vq4dit.vq.layer import CodebookSpec, VQLinear  # noqa: E402
from vq4dit.vq.modelref import reference  # noqa: E402

MB = 2**20
SETTINGS = [("W2", 256, 4), ("W3", 64, 2)]
PAPER = {"fp32": 2553.35, "total": 162.08, "assignments": 159.47, "codebooks_fp32": 0.77, "codebooks": 196}


def block_linears(spec):
    with torch.device("meta"):
        model = spec.build()
    pattern = re.compile(BLOCK_LINEARS)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)]


def analytic_sizes(linears, k, d, split_qkv):
    """Bytes per part for the block Linears quantized as VQLinear(k, d); codebooks as stored (fp16)."""
    codec = CODECS["VQLinear"]
    parts = {"fp32": 0, "assignments": 0, "codebooks": 0, "biases": 0, "n_codebooks": 0}
    for name, m in linears:
        groups = 3 if split_qkv and name.endswith(".qkv") else 1
        with torch.device("meta"):
            layer = VQLinear(m.in_features, m.out_features, k, d, groups=groups, bias=m.bias is not None, hard=True)
        specs = codec.tensor_specs(codec.describe(layer))
        nbytes = {s: math.prod(shape) * dtype.itemsize for s, (shape, dtype) in specs.items()}
        parts["fp32"] += 4 * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0))
        parts["assignments"] += nbytes["indices"]
        parts["codebooks"] += nbytes["codebook"]
        parts["biases"] += nbytes.get("bias", 0)
        parts["n_codebooks"] += groups
    return parts


def xl_table():
    linears = block_linears(DiTSpec("DiT-XL/2", 32, 1000, 4))
    lines = ["## DiT-XL/2, transformer blocks only (140 Linears; embedders and final layer stay FP)", "",
             "| setting | qkv | codebooks | FP32 MB | assignments MB | codebooks MB fp16 (fp32) | biases MB "
             "| total MB, fp16 codebooks (fp32) | compression |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, k, d in SETTINGS:
        for split in (False, True):
            p = analytic_sizes(linears, k, d, split)
            total = p["assignments"] + p["codebooks"] + p["biases"]
            lines.append(f"| {label} (k{k} d{d}) | {'split' if split else 'fused'} | {p['n_codebooks']} "
                         f"| {p['fp32'] / MB:.2f} | {p['assignments'] / MB:.2f} | {p['codebooks'] / MB:.2f} "
                         f"({2 * p['codebooks'] / MB:.2f}) | {p['biases'] / MB:.2f} | {total / MB:.2f} "
                         f"({(total + p['codebooks']) / MB:.2f}) | {p['fp32'] / total:.1f}x |")
    lines += ["", f"Paper (W2, DiT-XL/2 blocks): FP32 {PAPER['fp32']} MB -> {PAPER['total']} MB: assignments "
              f"{PAPER['assignments']} MB, codebooks {PAPER['codebooks_fp32']} MB in fp32 ({PAPER['codebooks']} "
              "codebooks, i.e. q, k, v as separate layers), the rest biases. Compare the W2 / split row's fp32 "
              "figures. Artifacts here store codebooks in fp16."]
    return lines


def dir_sizes(path):
    return {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}


def digits_table(kmeans_iters):
    spec = DiTSpec("DiT-Digits/2", IMAGE_SIZE, NUM_CLASSES, 1)
    lines = ["## DiT-Digits/2 artifacts on disk (random init; sizes do not depend on the weights)", "",
             "| artifact | model.safetensors bytes | quant_config.json | config.yaml | block Linears bytes "
             "| other FP tensors bytes |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = spec.build()
        fp_path = os.path.join(tmp, "fp.safetensors")
        save_dit(base, spec.name, fp_path)
        lines.append(f"| full precision (save_dit) | {os.path.getsize(fp_path):,} | - | - "
                     f"| {sum(4 * p.numel() for n, p in base.named_parameters() if n.startswith('blocks.')):,} | - |")
        for label, k, d in SETTINGS:
            for split in (False, True):
                model = spec.build()
                model.load_state_dict(base.state_dict())
                for p in model.parameters():  # zero-init adaLN would leave k-means nothing to cluster
                    torch.nn.init.normal_(p, std=0.02)
                layers = quantize_linears(model, CodebookSpec(k, d, kmeans_iters=kmeans_iters), split_qkv=split,
                                          progress=False)
                for layer in layers.values():
                    layer.harden()
                out = os.path.join(tmp, f"{label}_{split}")
                quant = save_quantized(model, reference(model, name=spec.name), out,
                                       {"wbits": int(math.log2(k)) // d, "dim": d})
                sizes = dir_sizes(out)
                nbytes = {key: math.prod(t["shape"]) * DTYPES[t["dtype"]].itemsize
                          for key, t in quant["tensors"].items()}
                q_bytes = sum(v for key, v in nbytes.items() if key.startswith("blocks."))
                other = sum(nbytes.values()) - q_bytes
                lines.append(f"| {label} k{k} d{d}, {'split' if split else 'fused'} qkv | "
                             f"{sizes['model.safetensors']:,} | {sizes['quant_config.json']:,} | "
                             f"{sizes['config.yaml']:,} | {q_bytes:,} | {other:,} |")
    lines += ["", "model.safetensors also holds a JSON header naming every tensor. The digits model is tiny, so "
              "its full-precision embedders and final layer are a large share of the quantized artifacts."]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kmeans-iters", type=int, default=2, help="k-means iterations for the digits artifacts")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "size_report.md"))
    args = p.parse_args()
    lines = ["# Model size report", "", "Command: `python benchmarks/size_report.py`", "", *xl_table(), "",
             *digits_table(args.kmeans_iters)]
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
