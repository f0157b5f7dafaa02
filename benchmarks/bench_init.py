"""Output-aware codebook initialisation (issue 19a): plain vs input-weighted k-means on the embedded digits DiT.

Captures every block Linear's inputs during FP teacher sampling (torch hooks; CFG 1.5, 50 steps, every other step
kept) for a fit seed and a held-out seed, then for W2 (k256 d4) and W3 (k64 d2): per-layer relative output error
||(W - W_hat) X||^2 / ||W X||^2 on the held-out inputs (full H, cross-block terms included), the k-means-only
model's noise-prediction MSE vs FP on the held-out model inputs, paired PSNR of a few samples vs FP, and seconds.
A second part times one DiT-XL/2-sized fc1 (4608 x 1152, random weight, random anisotropic H).

    OMP_NUM_THREADS=1 python benchmarks/bench_init.py            # writes benchmarks/results/init.md and init.json
"""
import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq4dit.evaluation.metrics import paired_mse, psnr_from_mse  # noqa: E402
from vq4dit.models.adapters.base import SampleSettings, TeacherPlan  # noqa: E402
from vq4dit.models.adapters.load import load_model  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq.kmeans import kmeans  # noqa: E402
from vq4dit.vq.weighted_kmeans import diagonal_blocks, gptvq, gptvq_assign, weighted_error, weighted_kmeans  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIGS = (("W2", 256, 4), ("W3", 64, 2))
METHODS = ("plain", "weighted", "weighted_pp", "feedback", "gptvq")
KINDS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")


@dataclass
class Timing:
    cpu: float = 0.0
    wall: float = 0.0

    def __add__(self, other):
        return Timing(self.cpu + other.cpu, self.wall + other.wall)


@dataclass
class Capture:
    """What one teacher run recorded: E[x x^T] (n, n) float64 per Linear, and the model inputs (x, t, y) of the
    kept steps (for the whole-model noise-prediction error)."""

    moments: dict
    inputs: list


def capture(model, adapter, seed, samples, steps):
    """Run the FP teacher (`samples` trajectories, `steps` steps, CFG 1.5) and record every other step."""
    names = adapter.linears(model)
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)
    state = {"call": 0}
    inputs = []

    def on_model(_, args):
        state["keep"] = state["call"] % 2 == 0
        state["call"] += 1
        if state["keep"]:
            inputs.append(tuple(a.detach().clone() for a in args))  # (x (2B, C, H, W), t (2B,), y (2B,))

    def on_linear(name):
        def hook(_, args):
            if state["keep"]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (M, n)
                sums[name] += x.t() @ x
                counts[name] += x.shape[0]
        return hook

    handles = [model.register_forward_pre_hook(on_model)]
    handles += [modules[n].register_forward_pre_hook(on_linear(n)) for n in names]
    plan = TeacherPlan(num_samples=samples, steps=steps, cfg_scale=1.5, seed=seed, batch_size=samples)
    with torch.no_grad():
        for _, run in adapter.teacher_runs(model, plan, "cpu"):
            run()
    for h in handles:
        h.remove()
    return Capture({n: sums[n] / counts[n] for n in names}, inputs)


def relative_output_error(w, w_hat, h):
    """||(W - W_hat) X||^2 / ||W X||^2 = tr(dW H dW^T) / tr(W H W^T) for H = E[x x^T] of the inputs X."""
    dw = (w - w_hat).double()
    return (torch.einsum("ri,ij,rj->", dw, h, dw) / torch.einsum("ri,ij,rj->", w.double(), h, w.double())).item()


def quantize_weight(w, h_fit, method, k, dim, seed):
    """-> (W_hat (out, in), Timing): CPU seconds of this process (robust to the other agents' load with one
    thread) and wall seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    if method == "plain":
        codebook, index = kmeans(w.reshape(-1, dim), k, iters=100, seed=seed)
    elif method == "gptvq":  # the weighted codebook, error-feedback assignments, codebook refit under the full H
        codebook, index = gptvq(w, h_fit, k, dim, seed=seed)
    else:
        init = "kmeans++" if method == "weighted_pp" else "kmeans"
        codebook, index = weighted_kmeans(w, diagonal_blocks(h_fit, dim), k, dim, seed=seed, init=init)
        if method == "feedback":  # error feedback without the refit
            index = gptvq_assign(w, h_fit, codebook, dim)
    return codebook[index].reshape(w.shape), Timing(time.process_time() - cpu, time.perf_counter() - start)


def prediction_mse(model, quantized, adapter, inputs):
    """Mean squared noise-prediction error of `quantized` vs `model` over the recorded inputs, and its ratio to the
    mean square of the FP prediction."""
    err = ref = 0.0
    with torch.no_grad():
        for args in inputs:
            fp = adapter.prediction(model, model(*args))
            q = adapter.prediction(quantized, quantized(*args))
            err += ((q - fp) ** 2).mean().item()
            ref += (fp ** 2).mean().item()
    return err / len(inputs), err / ref


def sample_psnr(model, quantized, adapter, num):
    """Mean PSNR (dB) of `num` paired samples (same seeds and labels) of `quantized` vs `model`."""
    settings = SampleSettings(seed=1234, steps=50, cfg_scale=1.5, batch_size=num, progress=False)
    conds, _ = adapter.conditions(model, num, seed=1234)
    fp = adapter.image_sampler(model, {}, settings, "cpu")(list(range(num)), conds)
    q = adapter.image_sampler(quantized, {}, settings, "cpu")(list(range(num)), conds)
    return float(np.mean([psnr_from_mse(paired_mse(q[i:i + 1], fp[i:i + 1])) for i in range(num)]))


@dataclass
class ModelRow:
    config: str
    method: str
    cpu_seconds: float
    wall_seconds: float
    mean_layer_error: float
    median_layer_error: float
    noise_mse: float
    noise_mse_relative: float
    psnr_db: float


def run_model(args):
    base = load_model("DiT-Digits/2", None)
    model, adapter = base.model, base.adapter
    fit = capture(model, adapter, args.fit_seed, args.samples, 50)
    held = capture(model, adapter, args.test_seed, args.samples, 50)
    modules = dict(model.named_modules())
    rows, layers = [], []
    for config, k, dim in CONFIGS:
        for method in METHODS:
            quantized, seconds, errors = copy.deepcopy(model), Timing(), []
            qmodules = dict(quantized.named_modules())
            for i, name in enumerate(fit.moments):
                w = modules[name].weight.detach()
                w_hat, sec = quantize_weight(w, fit.moments[name], method, k, dim, seed=i)
                seconds += sec
                errors.append(relative_output_error(w, w_hat, held.moments[name]))
                qmodules[name].weight.data.copy_(w_hat)
                layers.append({"config": config, "method": method, "layer": name, "error": errors[-1]})
            mse, rel = prediction_mse(model, quantized, adapter, held.inputs)
            rows.append(ModelRow(config, method, seconds.cpu, seconds.wall, float(np.mean(errors)),
                                 float(np.median(errors)), mse, rel,
                                 sample_psnr(model, quantized, adapter, args.psnr_samples)))
            print(rows[-1], flush=True)
    return rows, layers


def anisotropic_h(n, seed):
    """A random anisotropic second moment (n, n): log-normal column scales and correlated neighbours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    x = (x + 0.5 * torch.roll(x, 1, dims=1)) * torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    return x.t() @ x / x.shape[0]


def xl_problem():
    """A DiT-XL/2 fc1-shaped weight (4608, 1152), xavier-scaled normal, and a random anisotropic H (1152, 1152)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(4608, 1152, generator=g) * (2.0 / (4608 + 1152)) ** 0.5, anisotropic_h(1152, 1)


def lloyd_curve(iters_list):
    """Markdown rows: CPU seconds and block-diagonal weighted error of weighted_kmeans at each iteration count."""
    w, h = xl_problem()
    hb = diagonal_blocks(h, 4)
    lines = ["| iters | CPU s | block-diagonal weighted error |", "|---|---|---|"]
    for iters in iters_list:
        cpu = time.process_time()
        codebook, index = weighted_kmeans(w, hb, 256, 4, iters=iters, seed=0)
        lines.append(f"| {iters} | {time.process_time() - cpu:.1f} | {weighted_error(w, hb, codebook, index, 4):.2f} |")
        print(lines[-1], flush=True)
    return lines


def run_xl(args):
    """Seconds of plain vs weighted k-means on a DiT-XL/2 fc1 (4608 x 1152), W2, and the block-diagonal error."""
    w, h = xl_problem()
    out = []
    for method in [m for m in args.xl_methods.split(",") if m]:
        w_hat, seconds = quantize_weight(w, h, method, 256, 4, seed=0)
        out.append({"method": method, "cpu_seconds": seconds.cpu, "wall_seconds": seconds.wall,
                    "relative_output_error": relative_output_error(w, w_hat, h)})
        print(out[-1], flush=True)
    return out


def markdown(rows, layers, xl, args):
    lines = ["# Output-aware codebook initialisation (issue 19 lever a)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other agents (loaded), "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}.", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_init.py {' '.join(sys.argv[1:])}`",
             "", "## Embedded digits DiT (30 block Linears), k-means only (no calibration)", "",
             f"H fitted on teacher seed {args.fit_seed}, errors on held-out seed {args.test_seed} ({args.samples} "
             "trajectories x 25 kept steps each, CFG 1.5, 50 steps). plain: vq.kmeans (100 iterations); weighted: "
             "plain start + weighted Lloyd (vq.weighted_kmeans defaults); weighted_pp: weighted k-means++ seeding; "
             "feedback: the weighted codebook, then gptvq_assign (error feedback, full H); gptvq: the same then "
             "refit_codebook (10 CG steps, full H), i.e. vq.weighted_kmeans.gptvq. "
             f"PSNR: {args.psnr_samples} paired samples vs FP.", "",
             "| config | method | CPU s (30 layers) | wall s | mean layer rel. output error | median | "
             "noise MSE vs FP | relative | PSNR vs FP (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.config} | {r.method} | {r.cpu_seconds:.1f} | {r.wall_seconds:.1f} | "
                     f"{r.mean_layer_error:.4f} | {r.median_layer_error:.4f} | {r.noise_mse:.5f} | "
                     f"{r.noise_mse_relative:.4f} | {r.psnr_db:.2f} |")
    lines += ["", "Mean relative output error per kind of Linear (6 blocks each):", "",
              "| config | method | " + " | ".join(KINDS) + " |", "|---|---|" + "---|" * len(KINDS)]
    for r in rows:
        means = [np.mean([x["error"] for x in layers if x["config"] == r.config and x["method"] == r.method
                          and x["layer"].endswith(kind)]) for kind in KINDS]
        lines.append(f"| {r.config} | {r.method} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    lines += ["", "## DiT-XL/2 fc1 shape (4608 x 1152, W2 k256 d4), random weight, random anisotropic H", "",
              "| method | CPU s | wall s | relative output error (full H) |", "|---|---|---|---|"]
    lines += [f"| {x['method']} | {x['cpu_seconds']:.1f} | {x['wall_seconds']:.1f} | {x['relative_output_error']:.4f} |"
              for x in xl]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8, help="teacher trajectories per capture")
    p.add_argument("--fit-seed", type=int, default=0)
    p.add_argument("--test-seed", type=int, default=1)
    p.add_argument("--psnr-samples", type=int, default=16)
    p.add_argument("--xl-methods", default="plain,weighted,gptvq", help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--lloyd-curve", default=None, help="only time weighted Lloyd at these comma-separated iteration "
                   "counts on the XL fc1 problem, writing <out>_lloyd.md")
    p.add_argument("--out", default=os.path.join(RESULTS, "init"))
    args = p.parse_args()
    torch.manual_seed(0)
    if args.lloyd_curve:
        lines = ["# Weighted Lloyd iterations at DiT-XL/2 fc1 shape (4608 x 1152, k256 d4, random anisotropic H)", "",
                 f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_init.py {' '.join(sys.argv[1:])}` (shared, "
                 "loaded machine; CPU seconds of the one-thread process).", ""]
        write_text_atomic(args.out + "_lloyd.md", "\n".join(lines + lloyd_curve(
            [int(i) for i in args.lloyd_curve.split(",")])) + "\n")
        return
    rows, layers = run_model(args)
    xl = run_xl(args)
    write_text_atomic(args.out + ".md", markdown(rows, layers, xl, args))
    write_text_atomic(args.out + ".json", json.dumps({"rows": [asdict(r) for r in rows], "layers": layers,
                                                      "xl": xl}, indent=1))


if __name__ == "__main__":
    main()
