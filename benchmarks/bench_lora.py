"""What a LoRA adds to a quantized transformer: memory and forward time of quantized + LoRA against quantized alone.

The small SD3 transformer of bench_compile (random weights) is saved once full precision and once as a k-means W2
artifact in --work; each variant then runs in a fresh process (this file with --probe), which loads its model
(vq4dit.load_transformer for the artifact), adds a LoRA of rank r on every attention projection of every block
(to_q, to_k, to_v, to_out.0 and the text stream's add_*_proj / to_add_out: PEFT's LoraConfig, full precision, a
separate branch beside each VQ layer), runs one forward at batch 2 and prints one JSON line: tensor bytes of the
model and of the LoRA and the resident memory it added after loading and after the forward (RSS now minus RSS
after the imports). Forward times come from one process holding all variants, their calls interleaved (a shared
machine's load drifts). The full-precision model with and without the LoRA is the reference.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py        # writes benchmarks/results/lora.{json,md}
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MiB = 2**20
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
VARIANTS = (("full precision", 0), ("full precision + LoRA", 16), ("quantized W2", 0), ("quantized W2 + LoRA", 16),
            ("quantized W2 + LoRA", 64))


def rss():
    """Resident set size of this process now, in bytes (Linux: /proc/self/statm). Not getrusage's peak: importing
    diffusers peaks above what a small model adds."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def prepare(work):
    """Save the FP model (diffusers format) and its W2 artifact in `work` once; returns the batch-2 inputs' path."""
    import torch

    from benchmarks.bench_compile import quantize_w2, small_sd3
    from vq4dit.vq import save_quantized
    from vq4dit.vq.modelref import reference

    if os.path.isfile(os.path.join(work, "inputs.pt")):
        return
    model, inputs = small_sd3()
    model.save_pretrained(os.path.join(work, "fp"))
    quantize_w2(model)
    save_quantized(model, reference(model), os.path.join(work, "w2"), {"method": "kmeans", "wbits": 2, "dim": 4})
    torch.save(inputs, os.path.join(work, "inputs.pt"))


def load_variant(work, variant, rank):
    """The model of one variant: the FP model or the artifact (vq4dit.load_transformer), with a rank-`rank` LoRA."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from vq4dit import load_transformer

    if variant.startswith("quantized"):
        model = load_transformer(os.path.join(work, "w2"))
    else:
        model = SD3Transformer2DModel.from_pretrained(os.path.join(work, "fp")).eval()
    if rank:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS), model)
    return model


def probe(work, variant, rank):
    """Memory of one variant in this fresh process; prints one JSON line."""
    import torch
    from diffusers import SD3Transformer2DModel  # noqa: F401  (the imports belong to the baseline, not the model)

    from benchmarks.bench_compile import forward_call
    from vq4dit import enable_peft_lora

    enable_peft_lora()  # imports diffusers' LoRA loaders
    import_rss = rss()
    model = load_variant(work, variant, rank)
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    out = {"variant": variant, "rank": rank, "import_rss": import_rss, "threads": torch.get_num_threads(),
           "model_bytes": tensor_bytes([*model.parameters(), *model.buffers()]), "lora_bytes": tensor_bytes(lora),
           "load_rss": rss()}
    forward_call(model, torch.load(os.path.join(work, "inputs.pt")))()
    out["forward_rss"] = rss()
    print(json.dumps(out))


def forward_times(work, repeats):
    """{(variant, rank): median forward seconds}, all variants in this process, their calls interleaved."""
    import torch

    from benchmarks.bench_compile import forward_call, interleaved_times

    inputs = torch.load(os.path.join(work, "inputs.pt"))
    runs = {key: forward_call(load_variant(work, *key), inputs) for key in VARIANTS}
    return interleaved_times(runs, repeats)


def report(rows, meta):
    lines = ["# A LoRA on a quantized transformer: memory and speed (CPU)", "",
             f"{meta['model']}; LoRA on the {len(TARGETS)} attention projections of every block; forward at batch "
             f"2, median of {meta['repeats']} after a warm-up round, the variants' calls interleaved in one process; "
             f"memory of each variant in a fresh process. {meta['machine']}, torch "
             f"{meta['torch']}, {meta['threads']} thread(s) (OMP_NUM_THREADS={meta['omp']}). The machine was shared "
             f"with other jobs (load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after): "
             "times are comparable within this table only.", "",
             "| variant | rank | model tensors (MiB) | of which LoRA (MiB) | RSS added by load + forwards (MiB) "
             "| forward (ms) | vs quantized alone |", "|---|---|---|---|---|---|---|"]
    alone = next(r for r in rows if r["variant"] == "quantized W2" and r["rank"] == 0)
    for r in rows:
        lines.append(f"| {r['variant']} | {r['rank'] or '-'} | {r['model_bytes'] / MiB:.2f} | "
                     f"{r['lora_bytes'] / MiB:.2f} | {(r['forward_rss'] - r['import_rss']) / MiB:.1f} | "
                     f"{1e3 * r['forward_s']:.1f} | {r['forward_s'] / alone['forward_s']:.2f}x time, "
                     f"{r['model_bytes'] / alone['model_bytes']:.2f}x tensors |")
    return "\n".join(lines + [""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/vq4dit_bench_lora")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "lora"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        return probe(args.work, args.probe, args.rank)
    import torch

    from vq4dit.utils.fileio import write_text_atomic

    os.makedirs(args.work, exist_ok=True)
    prepare(args.work)
    load_before, rows = os.getloadavg()[0], []
    for variant, rank in VARIANTS:
        cmd = [sys.executable, __file__, "--probe", variant, "--rank", str(rank), "--work", args.work]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    for row, seconds in zip(rows, forward_times(args.work, args.repeats).values()):
        row["forward_s"] = seconds
    meta = {"model": "SD3Transformer2DModel (bench_compile.small_sd3: 4 blocks, width 384), k-means W2 (k=256, d=4)",
            "repeats": args.repeats, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": rows[0]["threads"],
            "omp": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_before": load_before, "load_after": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_text_atomic(args.out + ".json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_text_atomic(args.out + ".md", report(rows, meta))
    print(report(rows, meta))


if __name__ == "__main__":
    main()
