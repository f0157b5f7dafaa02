"""torch.compile of a quantized diffusers transformer against eager, and against the full-precision model compiled.

A small SD3 transformer (SD3Transformer2DModel, random weights, 4 blocks of width 384 over 16 x 16 latent tokens by
default) is quantized in memory with k-means W2 (k = 256, d = 4, hard assignment: calibration does not change the
cost of a forward) on every block Linear, as the quantize job selects them. Each variant's forward at batch 2 is
timed eager and compiled (inductor, default mode): the first compiled call (compile time) and the median of
--repeats calls after a warm-up round, the four variants' calls interleaved; compiled outputs are compared with eager.

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py      # writes benchmarks/results/compile.{json,md}
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def small_sd3(layers=4, heads=6, head_dim=64, sample_size=32, seed=0):
    """A random-weight SD3Transformer2DModel (eval) and a batch-2 input for it."""
    import torch
    from diffusers import SD3Transformer2DModel

    from vq4dit.models.adapters import adapter_for

    model = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, num_layers=layers,
                                  attention_head_dim=head_dim, num_attention_heads=heads,
                                  joint_attention_dim=256, caption_projection_dim=heads * head_dim,
                                  pooled_projection_dim=256, out_channels=16, pos_embed_max_size=sample_size)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # N(0, 0.02) everywhere (diffusers zero-initialises adaLN: blocks would be identities)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    shapes = adapter_for(model).example_inputs(model, rows=2, latent_hw=(sample_size, sample_size), tokens=32)
    return model.eval(), {k: torch.randn(v.shape, generator=gen) for k, v in shapes.items()}


def quantize_w2(model):
    """k-means W2 (k = 256, d = 4), hard, on the Linears the quantize job selects; in place."""
    from vq4dit.models.adapters import adapter_for
    from vq4dit.vq.apply import quantize_linears
    from vq4dit.vq.layer import CodebookSpec

    quantize_linears(model, CodebookSpec(256, 4, kmeans_iters=5), include=adapter_for(model).quant_include(model),
                     progress=False, soft=False)
    return model


def interleaved_times(runs, repeats):
    """{key: median seconds of `repeats` calls of runs[key]()}, after a warm-up round; the calls go round-robin over
    the keys, so every variant sees the same drift of a shared machine's load."""
    times = {key: [] for key in runs}
    for _ in range(1 + repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t[1:]) for key, t in times.items()}


def forward_call(model, inputs):
    import torch

    def run():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]
    return run


def measure(models, inputs, repeats):
    """Per model: eager and compiled forward times (interleaved_times over all four), the first compiled call, and
    compiled vs eager outputs."""
    import torch

    runs, results = {}, {}
    for name, model in models.items():
        runs[(name, "eager")], runs[(name, "compiled")] = forward_call(model, inputs), forward_call(
            torch.compile(model), inputs)
        eager_out = runs[(name, "eager")]()
        start = time.perf_counter()
        compiled_out = runs[(name, "compiled")]()
        results[name] = {"first_compiled_call_s": time.perf_counter() - start,
                         "max_abs_diff": (compiled_out - eager_out).abs().max().item(),
                         "max_abs_out": eager_out.abs().max().item()}
    for (name, mode), seconds in interleaved_times(runs, repeats).items():
        results[name][f"{mode}_s"] = seconds
    return results


def report(results, meta):
    lines = ["# torch.compile of a quantized transformer (CPU)", "",
             f"{meta['model']}; forward at batch 2, median of {meta['repeats']} calls after warm-up, "
             "the four variants' calls interleaved. "
             f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s) (OMP_NUM_THREADS="
             f"{meta['omp']}). The machine was shared with other jobs (load average {meta['load_before']:.1f} "
             f"before, {meta['load_after']:.1f} after): compare the rows with each other, not with other runs.", "",
             "| model | eager (ms) | compiled (ms) | speed-up | first compiled call (s) | max abs diff (max abs out) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {1e3 * r['eager_s']:.1f} | {1e3 * r['compiled_s']:.1f} | "
                     f"{r['eager_s'] / r['compiled_s']:.2f}x | {r['first_compiled_call_s']:.0f} | "
                     f"{r['max_abs_diff']:.1e} ({r['max_abs_out']:.2f}) |")
    q, f = results["quantized W2"], results["full precision"]
    lines += ["", f"Quantized compiled / FP compiled: {q['compiled_s'] / f['compiled_s']:.2f}x; quantized eager / FP "
              f"eager: {q['eager_s'] / f['eager_s']:.2f}x. The first compiled call includes inductor's C++ build "
              "unless its cache (/tmp/torchinductor_$USER) already holds the kernels: seconds mean a warm cache.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compile"))
    args = parser.parse_args(argv)
    import torch

    load_before = os.getloadavg()[0]
    fp, inputs = small_sd3(layers=args.layers)
    quantized = quantize_w2(small_sd3(layers=args.layers)[0])
    results = measure({"full precision": fp, "quantized W2": quantized}, inputs, args.repeats)
    meta = {"model": f"SD3Transformer2DModel, {args.layers} blocks, width 384, 256 image + 32 text tokens",
            "repeats": args.repeats, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_before": load_before, "load_after": os.getloadavg()[0]}
    from vq4dit.utils.fileio import write_text_atomic

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_text_atomic(args.out + ".json", json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    write_text_atomic(args.out + ".md", report(results, meta))
    print(report(results, meta))


if __name__ == "__main__":
    main()
