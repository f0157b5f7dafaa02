"""Quantize a DiT with VQ4DiT (or a baseline) and save a compact artifact.

    python quantize.py                                   # embedded digits model, W2 (k256 d4), VQ4DiT
    python quantize.py --config configs/dit_xl_256_w2.yaml --ckpt DiT-XL-2-256x256.pt --out out/xl_w2

Values come from the dataclass defaults, then the YAML preset (--config), then the flags given here.
"""
import argparse
import logging
import os

from jobs.config import load_config
from utils.cli import ArgumentParser, check_not_blank, run_cli

FLAGS = [
    # (flag, type, help); every flag maps to the QuantizeConfig field of the same name
    ("--model", str, "registry name, e.g. DiT-XL/2 (default DiT-Digits/2)"),
    ("--ckpt", str, "checkpoint: official .pt, training .pt (ema), safetensors, diffusers dir or hub id"),
    ("--image-size", int, "image size for latent models (256 or 512)"),
    ("--num-classes", int, "number of classes (1000 for ImageNet)"),
    ("--backend", str, "auto (diffusers for a pipeline directory or hub id) | vq4dit (map into the project's DiT) | "
                       "diffusers"),
    ("--recipe", str, "vq4dit (this project's defaults) | authors (the authors' published code: online, CFG 4, "
                      "L_r gate, codebooks frozen while soft; configs/recipes/authors.yaml)"),
    ("--method", str, "vq4dit (default) | kmeans (no calibration) | codebook (PQF-style) | rtn (scalar per channel)"),
    ("--wbits", int, "bits per weight (k = 2^(wbits*dim))"),
    ("--dim", int, "sub-vector length d"),
    ("--codebook-size", int, "codebook size k, overrides 2^(wbits*dim)"),
    ("--candidates", int, "candidate codewords per sub-vector n"),
    ("--ratio-init", str, "inverse_distance | uniform"),
    ("--kmeans-iters", int, "Lloyd iterations"),
    ("--kmeans-init", str, "fast (subsample seeding and fit, then full passes) | authors (k-means++ on all points, "
                           "exactly --kmeans-iters Lloyd iterations, empty clusters not re-seeded)"),
    ("--codebook-init", str, "kmeans (calibration starts from k-means of the weights, the paper) | gptvq (each "
                             "block's codebooks refit to its recorded inputs first: output-aware)"),
    ("--calib", str, "blockwise | joint | online (one update per teacher sampler step)"),
    ("--block-inputs", str, "quantized (sequential) | fp (independent blocks)"),
    ("--iters", int, "calibration iterations per block"),
    ("--batch-size", int, "calibration batch size"),
    ("--lr-ratio", float, "RMSprop learning rate of the ratio logits"),
    ("--lr-codebook", float, "RMSprop learning rate of codebooks and biases"),
    ("--lr-schedule", str, "constant | cosine (the codebook-and-bias learning rate falls to 0 over each block's "
                           "--iters updates, and over the end-to-end pass)"),
    ("--lambda-r", float, "weight of the ratio regulariser"),
    ("--ratio-gate", str, "none | running_min (L_r only above its running minimum within a trajectory)"),
    ("--train-codebooks", str, "always | when_hard (a codebook trains only once its layer is hard)"),
    ("--plateau", float, "stop a block's training once every layer is hard and its mean loss over 50 updates falls "
                         "by less than this fraction (0: always --iters updates)"),
    ("--e2e-iters", int, "block-wise: after the walk, this many updates of every codebook and bias on the error at "
                         "the last block of the quantized chain (0: no end-to-end pass)"),
    ("--e2e-lr", float, "RMSprop learning rate of codebooks and biases in the end-to-end pass"),
    ("--select-every", int, "progressive selection after every this many updates"),
    ("--ratio-reg", str, "ratio regulariser form: code (n * mean(r(1-r)), authors' code) | paper (mean(1-|2r-1|))"),
    ("--steps", int, "sampler steps of the teacher trajectory"),
    ("--cfg-scale", float, "classifier-free guidance scale of the teacher trajectory"),
    ("--calib-samples", int, "teacher trajectories"),
    ("--online-batch", int, "calib online: samples per trajectory"),
    ("--student-label-dropout", float, "calib online: drop the student's class labels with this probability"),
    ("--calib-timesteps", int, "timesteps kept per trajectory"),
    ("--cache-dtype", str, "recorded activations: fp16 | bf16 | fp32"),
    ("--max-cache-gb", float, "activations beyond this many GiB go to files in --cache-dir"),
    ("--cache-dir", str, "where activations beyond --max-cache-gb go (default <out>/calib_cache)"),
    ("--prompts", str, "text-to-image pipelines: teacher prompts, a text file with one per line (default: built-in "
                       "class-name prompts)"),
    ("--height", int, "text-to-image pipelines: teacher image height in pixels (default: the pipeline's)"),
    ("--width", int, "text-to-image pipelines: teacher image width in pixels (default: the pipeline's)"),
    ("--num-frames", int, "video pipelines: teacher frames per trajectory (default: the pipeline's)"),
    ("--include", str, "regex over qualified Linear names to quantize (default: every Linear in the blocks)"),
    ("--exclude", str, "regex of Linears kept in full precision (applied after --include)"),
    ("--seed", int, "random seed"),
    ("--device", str, "auto | cpu | cuda | cuda:N"),
]


def config_overrides(args):
    values = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in FLAGS}
    values["split_qkv"] = args.split_qkv
    return values


def default_out(config):
    name = config.model.model.replace("/", "_").replace("DiT-", "").lower()
    return f"outputs/{name}_{config.method}_w{config.codebooks.wbits}d{config.codebooks.dim}"


def main(args):
    texts = {flag: getattr(args, flag[2:].replace("-", "_")) for flag, kind, _ in FLAGS if kind is str}
    check_not_blank({"--config": args.config, **texts, "--out": args.out})
    config = load_config(args.config, config_overrides(args))
    if args.dry_run:
        print(config.to_yaml(), end="")
        from jobs.memory_plan import dry_run_plan  # torch is imported only for a text-to-image pipeline

        plan = dry_run_plan(config)
        if plan is not None:
            print(plan)
        return
    # imported here so that --dry-run and config errors answer without loading torch
    from jobs.quantize import quantize

    args.out = args.out or default_out(config)
    quantize(config, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")


def resume_hint(out):
    """After Ctrl-C: where a rerun of the same command picks up (calibration state is saved per block)."""
    from calib.state import STATE_DIR, resume_point

    point = resume_point(out) if out else None
    if point is None:
        return "no calibration state saved yet; rerun the same command to start over"
    return f"rerun the same command to resume from {point} (state in {os.path.join(out, STATE_DIR)})"


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset from configs/")
    for flag, kind, text in FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--split-qkv", action="store_true", default=None, help="q, k, v as three codebooks")
    parser.add_argument("--out", help="artifact directory (default outputs/<model>_<method>_w<bits>d<dim>)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds files vq4dit did "
                        "not write (they are kept: a file of an artifact's name that vq4dit did not write is never "
                        "replaced), and delete a calibration state there that this run would not resume (another "
                        "config, checkpoint or method); without it either is an error")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config (and, for a text-to-image "
                        "pipeline, its memory plan) and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def cli(argv=None):
    """Run quantize.py with `argv` (default: sys.argv[1:]); ends with SystemExit (2 on bad input, 130 on Ctrl-C) or
    returns."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    run_cli(main, args, on_interrupt=lambda: resume_hint(args.out))


if __name__ == "__main__":
    cli()
