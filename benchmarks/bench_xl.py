"""DiT-XL/2-sized cost with random weights (no checkpoint to download): quantization wall time per stage and
per block, peak device memory, and the forward time of the FP vs the quantized model. Meant for a lent GPU.

    python benchmarks/bench_xl.py                                # DiT-XL/2 256, the paper's W2 preset
    timeout 540 python benchmarks/bench_xl.py; python benchmarks/bench_xl.py   # in 10-minute slots: the
                                                                 # calibration resumes at the next block
    python benchmarks/bench_xl.py --model DiT-S/8 --image-size 64 --set iters=2 calib_samples=2   # smoke test

Weights are N(0, 0.02) everywhere (adaLN included, so every block does something): quality figures mean
nothing here, time and memory do. Everything lives in --work (the random checkpoint is written once and
reused); the report goes to --out.
"""
import argparse
import json
import os
import sys
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vq4dit.calib.checkpoints import LOG_NAME  # noqa: E402
from vq4dit.jobs.config import load_config  # noqa: E402
from vq4dit.jobs.quantize import quantize  # noqa: E402
from vq4dit.models.loading import DiTSpec, load_dit, save_dit  # noqa: E402
from vq4dit.utils.device import resolve_device  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq import load_quantized  # noqa: E402


def random_checkpoint(name, image_size, path, seed=0):
    """A DiT with N(0, 0.02) weights saved as safetensors at `path` (once; reused on later calls)."""
    if not os.path.exists(path):
        spec = DiTSpec(name, image_size // 8, 1000, 4)
        model = spec.build()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        save_dit(model, name, path)
    return path


def start_text(config):
    """Where calibration starts: the output-aware fit (the default for block-wise vq4dit) or plain k-means."""
    if config.output_aware:
        return (f"output-aware (codebook_init {config.codebooks.codebook_init}: each block's codebooks refit to its "
                "recorded inputs by gptvq when the walk reaches it)")
    return f"k-means codebooks (codebook_init {config.codebooks.codebook_init})"


@torch.no_grad()
def forward_seconds(model, device, batch, repeats=5):
    """Median wall seconds of one forward pass on a (batch, 4, s, s) latent batch (CFG doubling not included)."""
    x = torch.randn(batch, 4, model.input_size, model.input_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for _ in range(repeats + 1):  # the first call warms up kernels and caches
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x, t, y)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(args):
    os.makedirs(args.work, exist_ok=True)
    ckpt = random_checkpoint(args.model, args.image_size, os.path.join(args.work, "random.safetensors"))
    overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    config = load_config(os.path.join(ROOT, args.config), {**overrides, "model": args.model, "ckpt": ckpt,
                                                            "image_size": args.image_size})
    device = resolve_device(config.device)
    artifact = os.path.join(args.work, "artifact")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    quantize(config, artifact)
    wall = time.perf_counter() - start  # this call only: a resumed run reports its own part
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    log = os.path.join(artifact, LOG_NAME)  # absent for methods without calibration
    blocks = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    fp, _ = load_dit(config.model.model, ckpt, config.model.image_size, device=device)
    fp_s = forward_seconds(fp.eval(), device, args.batch)
    del fp
    quantized, _, _ = load_quantized(artifact, device)
    q_s = forward_seconds(quantized, device, args.batch)
    del quantized
    decoded, _, _ = load_quantized(artifact, device, decode=True)
    d_s = forward_seconds(decoded, device, args.batch)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    per_block = [b["seconds"] for b in blocks] or [0.0]
    lines = [
        f"# {args.model} {args.image_size}px cost, random weights ({name})", "",
        f"Command: `python benchmarks/bench_xl.py{''.join(' ' + a for a in sys.argv[1:])}`; torch {torch.__version__}; "
        f"config `{args.config}` with {overrides or 'no overrides'}.", "",
        "| quantity | value |", "|---|---|",
        f"| quantize wall s (this call: load, k-means, calibration of the blocks not yet done, save) | {wall:.1f} |",
        f"| calibration start | {start_text(config)} |",
        f"| calibrated blocks (all calls); blocks where the guard kept a layer's start | {len(blocks)}; "
        f"{sum(bool(b.get('reverted')) for b in blocks)} |",
        f"| calibrate_block s per block (training and guard; not the FP sweeps, moments and gptvq fit: see "
        f"bench_block.py): mean / min / max | {sum(per_block) / len(per_block):.1f} / {min(per_block):.1f} / "
        f"{max(per_block):.1f} |",
        f"| peak device memory GiB (this call) | {'-' if peak is None else f'{peak:.2f}'} |",
        f"| forward s, batch {args.batch}: FP / quantized / quantized with --decode-weights | {fp_s:.4f} / "
        f"{q_s:.4f} / {d_s:.4f} |",
        f"| artifact MB | {os.path.getsize(os.path.join(artifact, 'model.safetensors')) / 2**20:.2f} |",
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--config", default="dit_xl_256_w2")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--batch", type=int, default=16, help="batch of the forward timing")
    parser.add_argument("--work", default=os.path.join(ROOT, "outputs", "bench_xl"))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "xl_cost.md"))
    main(parser.parse_args())
