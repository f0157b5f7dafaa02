"""Time at scale (issue 31 item 5): W2 calibration of Flux-dev, Qwen-Image and Wan 2.1 14B on 1, 2, 4 and 8 GPUs,
from a FLOP model anchored on the per-update costs measured on an H200 (no weights needed: the blocks' Linear
shapes come from the diffusers classes built on the meta device from the published configs).

    python benchmarks/time_at_scale.py     # writes benchmarks/results/time_at_scale.md

Model, per block of a family (B = batch rows per update, P = calibration points, F = forward FLOPs per row):
- FLOPs per row of a block: 2 x in x out x (the tokens the Linear sees: image, text, all, or 1 for the modulation
  Linears) summed over its Linears, plus 4 x T_q x T_kv x inner width per attention.
- "today": seconds per update = a x (block parameters / Flux double block's) + b x B x (F / Flux double block's F),
  fitted to the H200 measurements of one Flux-dev double block at batch 1 and 4 (issue 31): fp32 0.54 / 0.65 s,
  bf16 autocast 0.34 / 0.37 s; the per-row part never faster than the target's rate (bf16's two points imply
  more). The fixed part a (index gathers, matrix-vector kernels) does not shrink when data parallelism splits
  the batch, so more GPUs hardly help today's update.
- "target": 3 x B x F FLOPs per update (forward and backward) at 30% of an H100's 989 dense bf16 TFLOP/s, split
  over N GPUs in even shares (vq4dit/calib/balance.py deals each minibatch's rows so; drawn at random, the busiest
  of 8 GPUs would compute about 4.2 of 16 rows, 2.1x the even share), plus a ring all-reduce of the block's
  gradients (ratio logits, n = 2 fp32 per sub-vector) at 400 GB/s.
- Both: 500 updates per block; 5 forward sweeps over P points per block (FP targets, argmax, final, moments,
  guard) and the teacher's recording (trajectories x steps x rows per step full-model forwards) at the target's
  rate, split over N; k-means + candidates 1.4 s per Linear (H200, issue 31), split over N by layer.
"""
import argparse
import dataclasses
import os
import re
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vq4dit.utils.fileio import write_text_atomic  # noqa: E402

H200 = {"fp32": ((1, 0.54), (4, 0.65)), "bf16": ((1, 0.34), (4, 0.37))}  # Flux-dev double block: (batch, s/update)
TARGET_FLOPS = 0.30 * 989e12  # 30% of an H100's dense bf16 peak
LINK_BYTES_PER_S = 400e9
KMEANS_S_PER_LAYER = 1.4
ITERS, SWEEPS = 500, 5
MODULATION = re.compile(r"norm1\.linear|norm1_context\.linear|norm\.linear|_mod\.")
TEXT = re.compile(r"add_[qkv]_proj|to_add_out|ff_context|txt_|attn2\.to_[kv]$")
BLOCK = re.compile(r"^((?:single_)?transformer_blocks|blocks)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    cls: str
    config: dict
    image_tokens: int
    text_tokens: int
    samples: int  # teacher trajectories
    steps: int  # sampler steps per trajectory
    kept: int  # steps kept as calibration points
    rows_per_step: int  # 2 with classifier-free guidance, 1 for guidance-distilled Flux-dev
    batch: int = 16  # rows per update (the default; a 480p video row holds 8x the tokens of a Flux row)


FAMILIES = [
    Family("Flux-dev 1024 px", "FluxTransformer2DModel",
           dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True),
           4096, 512, 32, 28, 14, 1),
    Family("Qwen-Image 1024 px", "QwenImageTransformer2DModel",
           dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
           4096, 256, 32, 50, 12, 2),
    Family("Wan 2.1 14B 480p, 81 frames", "WanTransformer3DModel",
           dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
           21 * 30 * 52, 512, 8, 50, 12, 2, batch=2),
]


@dataclasses.dataclass
class BlockCost:
    params: int = 0  # Linear weights
    flops_per_row: float = 0.0  # forward
    subvectors: int = 0  # at d = 4


def block_costs(family):
    """[BlockCost] of every block of `family`, from its Linears on the meta device."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, family.cls)(**family.config)
    blocks = {}
    everything = family.image_tokens + family.text_tokens
    for name, m in model.named_modules():
        found = BLOCK.match(name)
        if not found or not isinstance(m, nn.Linear):
            continue
        cost = blocks.setdefault(found.group(0), BlockCost())
        single = found.group(1).startswith("single")
        rows = 1 if MODULATION.search(name) else family.text_tokens if TEXT.search(name) else \
            everything if single else family.image_tokens
        cost.params += m.in_features * m.out_features
        cost.subvectors += m.in_features * m.out_features // 4
        cost.flops_per_row += 2 * m.in_features * m.out_features * rows
        if name.endswith("to_q"):  # one attention: joint / self over all its tokens, or cross to the text
            t_kv = family.text_tokens if "attn2" in name else everything if not name.startswith("blocks.") else \
                family.image_tokens
            t_q = family.image_tokens if name.startswith("blocks.") else everything
            cost.flops_per_row += 4 * t_q * t_kv * m.out_features
    return list(blocks.values()), sum(isinstance(m, nn.Linear) and BLOCK.match(n) is not None
                                      for n, m in model.named_modules())


def fitted_today(anchor, dtype):
    """(a, b) of s/update = a + b x B for the Flux double block, from the two H200 measurements."""
    (b1, t1), (b2, t2) = H200[dtype]
    slope = (t2 - t1) / (b2 - b1)
    return t1 - slope * b1, slope


def hours(family, costs, gpus, scenario, anchor):
    """(total hours, block updates' hours) of `family` whose block_costs are `costs` on `gpus` GPUs."""
    blocks, linears = costs
    points = family.samples * family.kept * family.rows_per_step
    total_flops_row = sum(b.flops_per_row for b in blocks)
    record = family.samples * family.steps * family.rows_per_step * total_flops_row / (TARGET_FLOPS * gpus)
    sweeps = SWEEPS * points * total_flops_row / (TARGET_FLOPS * gpus)
    kmeans = KMEANS_S_PER_LAYER * linears / gpus
    train = 0.0
    for b in blocks:
        if scenario == "target":
            allreduce = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * b.subvectors * 2 * 4 / LINK_BYTES_PER_S
            train += ITERS * (3 * family.batch * b.flops_per_row / (TARGET_FLOPS * gpus) + allreduce)
        else:
            fixed, per_row = fitted_today(anchor, scenario)
            rows = family.batch / gpus
            # the per-row slope of two measurements can imply more than the target's rate: never faster than that
            per_rows = max(per_row * rows * b.flops_per_row / anchor.flops_per_row,
                           3 * rows * b.flops_per_row / TARGET_FLOPS)
            train += ITERS * (fixed * b.params / anchor.params + per_rows)
    return (record + sweeps + kmeans + train) / 3600, train / 3600


def main(args):
    flux = FAMILIES[0]
    anchor = block_costs(flux)[0][0]  # transformer_blocks.0: a Flux-dev double block
    lines = ["# Time at scale: W2 calibration on 1-8 GPUs (a model, not a measurement)", "",
             "`python benchmarks/time_at_scale.py`; the model is in the script's docstring. 'today (fp32 / bf16)' "
             "scales the per-update costs measured on one H200 (issue 31) by each block's parameters and FLOPs; "
             "'target' is the update at 30% of an H100's bf16 peak (issue 31 item 4). Hours in total, and in "
             "parentheses the block updates' share. Batch 16 rows per update (Wan: 2, each row 32,760 tokens).", "",
             f"Flux-dev double block: {anchor.params / 1e6:.0f} M weights, {anchor.flops_per_row / 1e12:.2f} TFLOP "
             "per row forward.", "",
             "| model | blocks | GFLOP/row (all blocks) | GPUs | today fp32 h | today bf16 h | target h |",
             "|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        costs = block_costs(family)  # one meta-device model per family
        blocks = costs[0]
        gflop = sum(b.flops_per_row for b in blocks) / 1e9
        for gpus in (1, 2, 4, 8):
            cells = [f"{total:.2f} ({train:.2f})" for total, train in
                     (hours(family, costs, gpus, s, anchor) for s in ("fp32", "bf16", "target"))]
            lines.append(f"| {family.name} | {len(blocks)} | {gflop:,.0f} | {gpus} | " + " | ".join(cells) + " |")
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "time_at_scale.md"))
    main(parser.parse_args())
