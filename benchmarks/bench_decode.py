"""Where a quantized layer's decode time goes, and what it adds to a model's forward, on this CPU.

Part 1, per layer (DiT layer shapes, W2 k256 d4, random indices): process CPU microseconds of each step of the
previous decode (index_select of (k, d) codebook rows chunk by chunk, each chunk's indices cast to int32, into a
freshly allocated weight), of the index_select decode (indices cast once into a reused int32 scratch, one gather of
16-byte codewords into the reused workspace buffer) and of the current one (vq/kernels/native.py: the uint8
indices read as stored by a C loop), beside the layer's matmul at a batch.

Part 2, per model: a full-precision DiT and a copy whose block Linears are hard VQ (random codebooks and indices,
split qkv) or RTN W2 layers, in one process, forwards alternating FP / quantized so that both see the same load;
process CPU seconds (all its threads; other processes' jobs disturb it far less than wall time), the lower decile
and the median of --repeats rounds. A VQ model runs twice per round: decoding with the native CPU gather (the
default where a C compiler is found) and, as a second copy whose decode plans were made under VQ4DIT_NATIVE=0,
with torch.index_select. Random weights: only time means anything.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode.py              # writes benchmarks/results/deploy_decode.md

The results file is rewritten after each model row, so a run stopped early keeps what it measured.
"""
import argparse
import contextlib
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vq4dit.models.loading import DiTSpec  # noqa: E402
from vq4dit.vq.apply import BLOCK_LINEARS, replace_linears  # noqa: E402
from vq4dit.vq.kernels import native  # noqa: E402
from vq4dit.vq.kernels.decode import gather_plan, workspace  # noqa: E402
from vq4dit.vq.layer import VQLinear  # noqa: E402
from vq4dit.vq.rtn import RTNLinear  # noqa: E402

LAYERS = {"DiT-XL/2 fc1": (1152, 4608, 512), "DiT-B/2 fc1": (768, 3072, 512), "DiT-B/2 qkv": (768, 2304, 512),
          "embedded fc1": (128, 512, 128)}  # (in, out, rows of x at batch 2: 2 x tokens)
# registry name, input size, channels, classes
MODELS = {"embedded": ("DiT-Digits/2", 16, 1, 10), "DiT-B/2": ("DiT-B/2", 32, 4, 1000)}
OLD_CHUNK = 1 << 18  # sub-vectors per index_select in the previous decode


def micros(fn, repeats):
    """Lower decile of `repeats` process CPU times of fn(), in microseconds, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.process_time_ns()
        fn()
        times.append(time.process_time_ns() - start)
    return sorted(times)[len(times) // 10] / 1e3


def old_decode(codebook, indices):
    """The previous inference decode: a fresh weight, rows of (k, d) gathered chunk by chunk with int32 casts."""
    g, _, d = codebook.shape
    out = torch.empty(indices.shape[0], d, dtype=codebook.dtype)
    per_group = indices.shape[0] // g
    for group in range(g):
        for s in range(group * per_group, (group + 1) * per_group, OLD_CHUNK):
            e = min(s + OLD_CHUNK, (group + 1) * per_group)
            torch.index_select(codebook[group], 0, indices[s:e].int(), out=out[s:e])
    return out


@contextlib.contextmanager
def native_setting(value):
    """Decode plans made inside take the native gather ("1") or index_select ("0"); the setting is restored after
    (plans already made keep their gather)."""
    previous = os.environ.get("VQ4DIT_NATIVE")
    os.environ["VQ4DIT_NATIVE"] = value
    native._load.cache_clear()
    try:
        yield
    finally:
        os.environ.pop("VQ4DIT_NATIVE") if previous is None else os.environ.update(VQ4DIT_NATIVE=previous)
        native._load.cache_clear()


@torch.no_grad()
def layer_rows(repeats):
    """{layer: {step: microseconds}} for the decode steps and the layer's inference forward (no autograd: the
    decode plan into the workspace) and matmul."""
    rows = {}
    for name, (in_f, out_f, m) in LAYERS.items():
        groups = 3 if name.endswith("qkv") else 1
        layer = VQLinear(in_f, out_f, 256, 4, groups=groups, hard=True)
        layer.codebook.data.normal_(0, 0.02)
        layer.indices.random_(0, 256)
        cb, idx, n = layer.codebook.detach(), layer.indices, layer.indices.shape[0]
        index, buffer = workspace("index", n, torch.int32, idx.device), workspace("weight", n * 4, torch.float32, "cpu")
        x, weight = torch.randn(m, in_f), layer.weight().detach()
        plans = {}
        for setting in ("0", "1"):  # a forward's decode with index_select, then with the native gather
            with native_setting(setting):
                plans[setting] = gather_plan(cb, idx, buffer.view(n, 4))
        rows[name] = {
            "previous decode (chunked row gather, fresh weight)": micros(lambda: old_decode(cb, idx), repeats),
            "  fresh weight: allocate + first write": micros(lambda: torch.empty(n * 4).fill_(0), repeats),
            "  uint8 -> int32 index cast": micros(lambda: index.copy_(idx), repeats),
            "  row gather (k, 4) into a buffer": micros(
                lambda: torch.index_select(cb[0], 0, index[:n // groups], out=buffer.view(n, 4)[:n // groups]),
                repeats) * groups,
            "index_select decode (16-byte gather into the workspace)": micros(plans["0"], repeats),
            "  the gather alone": micros(lambda: torch.index_select(
                cb[0].view(torch.complex128).view(-1), 0, index[:n // groups],
                out=buffer.view(torch.complex128)[:n // groups]), repeats) * groups,
            "current decode: native gather, uint8 indices (no cast)": micros(plans["1"], repeats),
            "layer forward (decode + matmul)": micros(lambda: layer(x), repeats),
            "matmul alone, batch 2": micros(lambda: F.linear(x, weight, layer.bias), repeats),
        }
    return rows


def quantized_copy(model, kind):
    """A copy of `model` with its block Linears hard VQ W2 (k256 d4, qkv in 3 groups) or RTN W2, random codes."""
    def make(name, linear):
        if kind == "rtn":
            return RTNLinear.from_linear(linear, 2)
        layer = VQLinear(linear.in_features, linear.out_features, 256, 4, groups=3 if name.endswith("qkv") else 1,
                         hard=True)
        layer.codebook.data.normal_(0, 0.02)
        layer.indices.random_(0, 256)
        layer.bias.data.copy_(linear.bias.detach())
        return layer

    quantized = copy.deepcopy(model)
    replace_linears(quantized, BLOCK_LINEARS, make, progress=False)
    return quantized.eval()


def model_rows(args, done):
    """Yields {model, kind, batch, lower decile and median ms of each variant, ratios to FP}, the variants alternating
    (FP, quantized, and for VQ the index_select copy); `done(row)` is called after each (the results file is
    rewritten, so a run cut short keeps its rows)."""
    for label in args.models:
        name, size, channels, classes = MODELS[label]
        fp = DiTSpec(name, size, classes, channels).build().eval()
        for kind in args.kinds:
            variants = {"fp": fp, "q": quantized_copy(fp, kind)}
            if kind == "vq":
                variants["q_index_select"] = copy.deepcopy(variants["q"])
            for batch in args.batches:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(batch, channels, size, size, generator=gen)
                t = torch.randint(0, 1000, (batch,), generator=gen)
                y = torch.randint(0, classes, (batch,), generator=gen)
                times = {key: [] for key in variants}
                reps = max(2, args.repeats // (4 if batch > 8 else 1) // (8 if label != "embedded" else 1))
                with torch.no_grad():
                    for key, model in variants.items():  # warm-up; makes each copy's decode plans
                        with native_setting("0" if key == "q_index_select" else "1"):
                            model(x, t, y)
                    for _ in range(reps):
                        for key, model in variants.items():
                            start = time.process_time()
                            model(x, t, y)
                            times[key].append(time.process_time() - start)
                row = {"model": label, "kind": kind, "batch": batch, "pairs": reps}
                for key, values in times.items():
                    row[key + "_low"] = sorted(values)[len(values) // 10] * 1e3
                    row[key + "_median"] = sorted(values)[len(values) // 2] * 1e3
                for key in variants:
                    if key != "fp":
                        row[key + "_ratio_low"] = row[key + "_low"] / row["fp_low"]
                        row[key + "_ratio_median"] = row[key + "_median"] / row["fp_median"]
                done(row)


def report(layers, models, args, load):
    lines = ["# Decode cost per layer and per model (CPU)", "",
             f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/bench_decode.py"
             + "".join(f" {a}" for a in sys.argv[1:]) + "`  ",
             f"torch threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d %H:%M')}; load average (1 min) "
             f"before / after {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores (other sessions' jobs)", "",
             "Process CPU microseconds, lower decile of the repeats; indented rows are parts of the row above.", ""]
    names = list(layers)
    heads = [f"{n} ({LAYERS[n][1]} x {LAYERS[n][0]}, x: {LAYERS[n][2]} rows)" for n in names]
    lines += ["| step | " + " | ".join(heads) + " |", "|---|" + "---|" * len(names)]
    for step in layers[names[0]]:
        lines.append(f"| {step} | " + " | ".join(f"{layers[n][step]:.0f}" for n in names) + " |")
    lines += ["", "Forward of a whole model, the variants alternating in one process (process CPU ms; for VQ, "
              "the quantized model decodes with the native gather and its copy with index_select):", "",
              "| model | quantized | batch | rounds | FP ms (low / median) | quantized ms | quantized / FP "
              "(low / median) | index_select copy ms | index_select / FP (low / median) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in models:
        cells = [r["model"], f"{r['kind']} W2", r["batch"], r["pairs"], f"{r['fp_low']:.1f} / {r['fp_median']:.1f}"]
        for key in ("q", "q_index_select"):
            if key + "_low" in r:
                cells += [f"{r[key + '_low']:.1f} / {r[key + '_median']:.1f}",
                          f"**{r[key + '_ratio_low']:.3f}** / {r[key + '_ratio_median']:.3f}"]
            else:
                cells += ["", ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(args):
    from vq4dit.utils.fileio import write_text_atomic

    torch.manual_seed(0)
    load = [os.getloadavg()[0], os.getloadavg()[0]]
    layers, models = layer_rows(args.layer_repeats), []

    def write(row=None):
        if row is not None:
            models.append(row)
            print(json.dumps(row), flush=True)
        load[1] = os.getloadavg()[0]
        write_text_atomic(args.out + ".md", report(layers, models, args, load))
        write_text_atomic(args.out + ".json", json.dumps({"command": sys.argv, "load_average": load, "layers": layers,
                                                          "models": models}, indent=1) + "\n")

    write()
    model_rows(args, write)
    print(open(args.out + ".md").read())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--kinds", nargs="+", choices=["vq", "rtn"], default=["vq", "rtn"])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--repeats", type=int, default=40, help="FP / quantized forward pairs (fewer for big ones)")
    parser.add_argument("--layer-repeats", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "deploy_decode"))
    main(parser.parse_args())
