"""Cost at real size (issue 19 item 4): ONE DiT-XL/2 block calibrated at full shape, random weights and inputs,
the default config (output-aware start): seconds, peak memory and FLOPs of each stage of what the block-wise walk
does for one block, and their extrapolation to 28 blocks and to a GPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_block.py --points 256 --iters 5  # a loaded 2-core CPU (block_xl.md)
    python benchmarks/bench_block.py --iters 500 --device cuda                # a lent GPU: the default in full

The walk itself runs (calib.blockwise.calibrate_blockwise on a one-block model); each stage is timed by wrapping the
function the walk calls for it. Weights N(0, 0.02) (adaLN included); inputs N(0, 1): tokens (M, T, D) fp16 and c
(M, D) fp32, as the activation cache holds them. FLOPs are counted from the shapes.
"""
import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from unittest import mock

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import vq4dit.calib.blockwise as blockwise  # noqa: E402
import vq4dit.jobs.methods as methods  # noqa: E402
from vq4dit.calib.cache import ActivationStore  # noqa: E402
from vq4dit.calib.calls import flatten, map_leaves  # noqa: E402
from vq4dit.calib.capture import CalibrationSet  # noqa: E402
from vq4dit.calib.checkpoints import CalibLog, CheckpointStore  # noqa: E402
from vq4dit.calib.guard import PROBE_ROWS  # noqa: E402
from vq4dit.calib.modes import CalibData  # noqa: E402
from vq4dit.calib.problem import Problem  # noqa: E402
from vq4dit.calib.record import BlockCall  # noqa: E402
from vq4dit.calib.walk import WalkPlan, WalkState  # noqa: E402
from vq4dit.jobs.config import QuantizeConfig  # noqa: E402
from vq4dit.jobs.runkey import RunKey  # noqa: E402
from vq4dit.models.adapters.dit import DiTAdapter  # noqa: E402
from vq4dit.models.dit import DiTBlock  # noqa: E402
from vq4dit.utils.device import resolve_device  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.utils.precision import set_tf32  # noqa: E402

_TEACHER = QuantizeConfig().teacher  # the default calibration set: 32 trajectories x 2 (CFG) x 25 kept steps
DEFAULT_POINTS = _TEACHER.calib_samples * 2 * _TEACHER.calib_timesteps  # 1600
DEPTH = 28  # DiT-XL/2
SWEEPS = ("FP targets sweep", "argmax sweep (error before)", "final sweep")  # calib.blockwise's sweeps, in call order


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 1152
    heads: int = 16
    mlp_ratio: float = 4.0
    tokens: int = 256  # 256x256 images: 32x32 latents, patch 2


def reset_peak_rss():
    """Restart the RSS high-water mark (Linux clear_refs 5); False where the kernel refuses (peaks accumulate)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            return f.write("5") > 0
    except OSError:
        return False


class Stopwatch:
    """Seconds and peak RSS per stage label; a stage nested in another (gptvq inside prepare) is timed, while the
    peak belongs to the outermost stage."""

    def __init__(self, sync):
        self.seconds, self.peak_mib, self.depth, self.sync, self.resets = {}, {}, 0, sync, True

    @contextlib.contextmanager
    def stage(self, label):
        self.sync()
        outer = self.depth == 0
        if outer:
            self.resets = reset_peak_rss() and self.resets
        self.depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.depth -= 1
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
            if outer:  # ru_maxrss: VmHWM in KiB
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                self.peak_mib[label] = max(self.peak_mib.get(label, 0.0), rss)
            print(f"{label}: {self.seconds[label]:.1f} s so far", file=sys.stderr, flush=True)

    def wrap(self, fn, label):  # fn timed under label(n) for its n-th call (or the string `label`)
        calls = itertools.count()

        def timed(*args, **kwargs):
            with self.stage(label(next(calls)) if callable(label) else label):
                return fn(*args, **kwargs)
        return timed


def random_block(shape, seed):
    """A one-block model the DiT adapter understands (blocks.0.*), every parameter N(0, 0.02)."""
    model = nn.Module()
    model.blocks = nn.ModuleList([DiTBlock(shape.hidden, shape.heads, shape.mlp_ratio)])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def random_calibration_set(store, shape, points, seed, chunk=64):
    """One recorded call blocks.0(x, c) over `points` rows: x (M, T, D) tokens and c (M, D) in the store's dtypes."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = store.empty((points, shape.tokens, shape.hidden), store.token_dtype)  # (M, T, D), 0.94 GB at M = 1600
    for s in range(0, points, chunk):  # chunks: no fp32 copy of the whole tensor
        x[s:s + chunk] = torch.randn(x[s:s + chunk].shape, generator=gen)
    c = store.empty((points, shape.hidden), torch.float32)
    c.copy_(torch.randn(c.shape, generator=gen))
    keys, (spec, _) = ("s0.0", "s0.1"), flatten({"args": [x, c], "kwargs": {}})
    call = BlockCall("blocks.0", map_leaves(spec, lambda node: {"slot": keys[node["t"]]}), {"t": 0})
    return CalibrationSet([call], dict(zip(keys, (x, c))), {k: True for k in keys}, points)


def forward_flops(shape):
    """FLOPs of one block forward per point: the Linears on T tokens, attention's two products, adaLN on c."""
    d, t = shape.hidden, shape.tokens
    return 2 * t * d * d * (4 + 2 * shape.mlp_ratio) + 4 * t * t * d + 2 * d * 6 * d


def gptvq_flops(out, n, k, dim):
    """(fp32, fp64) FLOPs of vq.weighted_kmeans.gptvq on an (out, n) weight, upper bound on the k-means passes
    (20 on <= 512k sampled sub-vectors, then 5 on all N; they stop early on convergence)."""
    subs = out * n // dim
    kmeans = 2 * k * dim * (20 * min(subs, 512 * k) + 5 * subs)
    refit = 11 * 2 * out * n * n  # the (out x in) x (in x in) product: once for the residual, then per CG step
    assign = out * n * n + 3 * out * k * n  # error feedback over the later columns + the distances per group
    cholesky = 4 * n ** 3 / 3  # H -> chol -> inverse -> chol of the inverse
    return kmeans + refit, assign + cholesky


def kmeans_flops(out, n, k, dim):  # vq.kmeans.kmeans, fast: seeding on 64k, <= 100 passes on 512k, <= 10 on all
    subs = out * n // dim
    return 3 * k * 10 * 64 * k * dim + 2 * k * dim * (100 * min(subs, 512 * k) + 10 * subs)


def stage_flops(shape, layers, points, iters, batch, k, dim):
    """{stage: (fp32 FLOPs, fp64 FLOPs)} of the walk for one block; layers {name: (out, in)}."""
    f = forward_flops(shape)
    per_token = sum(2 * n * n for name, (_, n) in layers.items() if "adaLN" not in name)
    per_point = sum(2 * n * n for name, (_, n) in layers.items() if "adaLN" in name)
    out = {"k-means": (sum(kmeans_flops(o, n, k, dim) for o, n in layers.values()), 0)}
    out.update({s: (points * f, 0) for s in SWEEPS})
    out["input moments"] = (points * f, points * (shape.tokens * per_token + per_point))
    out.update({f"gptvq {name}": gptvq_flops(o, n, k, dim) for name, (o, n) in layers.items()})
    out["training"] = (iters * 3 * batch * f, 0)
    out["guard"] = (2 * min(points, PROBE_ROWS) * f, 0)  # calibrated and start; + 1 sweep per layer on a revert
    return out


def run_walk(args, config, shape, device):
    """Build, quantize and calibrate one block; returns (Stopwatch, layer shapes {name: (out, in)}, block stats)."""
    cuda = device.startswith("cuda")
    set_tf32(cuda)  # as the quantize job runs: TF32 matmuls on CUDA
    clock = Stopwatch(torch.cuda.synchronize if cuda else lambda: None)
    with clock.stage("build block + random inputs"):
        student = random_block(shape, config.seed).to(device)
        teacher = copy.deepcopy(student)
        store = ActivationStore(None, None, config.cache.dtype)
        cset = random_calibration_set(store, shape, args.points, config.seed)
    adapter = DiTAdapter()
    method = methods.method_for(config.method, config.codebooks, config.seed)
    with clock.stage("k-means"):
        layers = method.build(student, adapter.quant_include(student), config.seed, progress=False)
    names = list(layers)
    problem = Problem(student, teacher, adapter, layers, clock.wrap(method.prepare, "prepare (gptvq + soften)"),
                      config.seed, progress=False, needs_moments=config.output_aware)
    plan = WalkPlan(cset.calls, cset.batched, cset.rows, sequential=True)
    data = CalibData(cset, store, plan, WalkState.start(cset, sequential=True, e2e=False))
    patches = {(blockwise, "sweep"): lambda n: SWEEPS[n] if n < len(SWEEPS) else f"sweep {n}",
               (blockwise, "block_input_moments"): "input moments", (blockwise, "train"): "training",
               (blockwise, "starting_point"): "guard", (blockwise, "keep_better"): "guard",
               (methods, "fit_outputs_"): lambda n: f"gptvq {names[n]}"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for (module, attr), label in patches.items():
            stack.enter_context(mock.patch.object(module, attr, clock.wrap(getattr(module, attr), label)))
        checkpoints = CheckpointStore(tmp, RunKey.of(config))
        checkpoints.save = clock.wrap(checkpoints.save, "state save")
        calibration = dataclasses.replace(config.calibration, iters=args.iters)
        start = time.perf_counter()  # not a stage: the stages inside it keep their own peaks
        stats = blockwise.calibrate_blockwise(problem, data, calibration, checkpoints, CalibLog(tmp))[0]
        stats["walk_seconds"] = time.perf_counter() - start
    if cuda:  # the whole run's peak (the cache stays in CPU memory, as in the job)
        stats["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return clock, {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}, stats


def extrapolation(args, default_iters):
    """{stage: factor} from this run (args.points, args.iters) to the default (1600 points, default_iters)."""
    return {**{s: DEFAULT_POINTS / args.points for s in (*SWEEPS, "input moments")},
            "training": default_iters / args.iters,
            "guard": min(DEFAULT_POINTS, PROBE_ROWS) / min(args.points, PROBE_ROWS)}


def summarise(args, config, shape, clock, shapes):
    """The figures as one JSON-able dict: per stage measured and extrapolated, totals, 28 blocks, GPU estimate."""
    c, default_iters, batch = config.codebooks, QuantizeConfig().calibration.iters, config.calibration.batch_size
    run = stage_flops(shape, shapes, args.points, args.iters, batch, c.k, c.dim)
    full = stage_flops(shape, shapes, DEFAULT_POINTS, default_iters, batch, c.k, c.dim)
    seconds = dict(clock.seconds)
    seconds["soften (prepare minus gptvq)"] = seconds.pop("prepare (gptvq + soften)") - sum(
        v for k, v in seconds.items() if k.startswith("gptvq"))
    factors = extrapolation(args, default_iters)
    stages = {}
    for name, s in seconds.items():
        f32, f64 = run.get(name, (0, 0))
        stages[name] = {"seconds": s, "peak_rss_mib": clock.peak_mib.get(name), "gflop_fp32": f32 / 1e9,
                        "gflop_fp64": f64 / 1e9, "gflops_achieved": (f32 + f64) / 1e9 / s if s > 0 else None,
                        "seconds_at_default": s * factors.get(name, 1.0),
                        "tflop_at_default": sum(full.get(name, (0, 0))) / 1e12}
    walk = [n for n in stages if n != "build block + random inputs"]
    block_s = sum(stages[n]["seconds_at_default"] for n in walk)
    block_tflop = sum(stages[n]["tflop_at_default"] for n in walk)
    peak = max(clock.peak_mib.values())
    extra_rows = DEFAULT_POINTS - args.points  # the walk holds inputs and targets (M, T, D) in fp16, and c (M, D)
    extra_mib = extra_rows * (2 * shape.tokens * shape.hidden * 2 + shape.hidden * 4) / 2**20
    record_tflop = config.teacher.calib_samples * 2 * config.teacher.steps * DEPTH * forward_flops(shape) / 1e12
    return {"stages": stages, "layers": {n: list(v) for n, v in shapes.items()},
            "per_block_seconds_at_default": block_s, "per_block_tflop_at_default": block_tflop,
            "model_seconds_at_default": DEPTH * block_s, "model_tflop_at_default": DEPTH * block_tflop,
            "gpu_seconds_estimate": DEPTH * block_tflop / args.gpu_tflops, "record_tflop": record_tflop,
            "peak_rss_mib": peak, "peak_rss_mib_at_default_estimate": peak + max(extra_mib, 0),
            "peak_resets_per_stage": clock.resets, "forward_gflop_per_point": forward_flops(shape) / 1e9}


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def markdown(args, config, s, stats, device):
    """The report: what ran, one row per stage, the totals and the extrapolations, labelled as such."""
    default_iters, cb = QuantizeConfig().calibration.iters, config.codebooks
    rows = [f"| {n} | {v['seconds']:.2f} | {fmt(v['peak_rss_mib'], '.0f')} | {v['gflop_fp32']:.1f} / "
            f"{v['gflop_fp64']:.1f} | {fmt(v['gflops_achieved'])} | {v['seconds_at_default']:.1f} | "
            f"{v['tflop_at_default']:.2f} |" for n, v in s["stages"].items()]
    totals = [
        (f"one block forward, GFLOP per point (T = {args.tokens})", f"{s['forward_gflop_per_point']:.2f}"),
        ("walk of this block, this run, s (measured)", f"{stats['walk_seconds']:.0f}"),
        ("one block at the default, this CPU, s (EXTRAPOLATED)", f"{s['per_block_seconds_at_default']:.0f}"),
        ("one block at the default, TFLOP", f"{s['per_block_tflop_at_default']:.1f}"),
        (f"{DEPTH} blocks (DiT-XL/2), this CPU, hours (EXTRAPOLATED)", f"{s['model_seconds_at_default'] / 3600:.1f}"),
        (f"{DEPTH} blocks, TFLOP", f"{s['model_tflop_at_default']:.0f}"),
        (f"{DEPTH} blocks on a GPU at {args.gpu_tflops:.0f} TFLOP/s effective, s (ESTIMATE = FLOPs / rate; fp64 "
         "stages, batch-16 training and Python overhead run below such a rate)", f"{s['gpu_seconds_estimate']:.0f}"),
        (f"teacher recording before the walk (NOT measured): {config.teacher.calib_samples} x 2 (CFG) x "
         f"{config.teacher.steps} steps x {DEPTH} blocks, TFLOP", f"{s['record_tflop']:.0f}"),
        ("peak RSS MiB, this run (measured)", f"{s['peak_rss_mib']:.0f}"),
        (f"peak RSS MiB at {DEFAULT_POINTS} points (ESTIMATE: + the larger fp16 inputs and targets)",
         f"{s['peak_rss_mib_at_default_estimate']:.0f}")]
    if "peak_gpu_mib" in stats:
        totals.append(("peak GPU memory MiB, this run (measured)", f"{stats['peak_gpu_mib']:.0f}"))
    lines = [
        f"# One DiT block at full shape (hidden {args.hidden}, {args.heads} heads, T = {args.tokens}) calibrated as "
        f"the walk does it ({device})", "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python benchmarks/bench_block.py"
        f"{''.join(' ' + a for a in sys.argv[1:])}`; torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "The machine was loaded by other jobs (2 cores shared by several agents): seconds are upper bounds.", "",
        f"Default config (method {config.method}, W{cb.wbits} k{cb.k} d{cb.dim}, output-aware start: "
        f"{config.output_aware}), N(0, 0.02) weights, {args.points} random calibration points (default "
        f"{DEFAULT_POINTS}), **{args.iters} training iterations, not {default_iters}**. The last two columns are "
        f"for the default: seconds EXTRAPOLATED (sweeps and moments x {DEFAULT_POINTS}/{args.points}, training x "
        f"{default_iters}/{args.iters}, the guard x probe rows; the rest does not depend on them), FLOPs counted "
        "from the shapes (k-means and gptvq: upper bounds). gptvq rows are nested in prepare (no own peak).", "",
        "| stage | s measured | peak RSS MiB | GFLOP fp32 / fp64 | GFLOP/s | s at default | TFLOP at default |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"Training: {s['stages']['training']['seconds'] / args.iters:.2f} s per iteration (batch "
        f"{config.calibration.batch_size}) over {args.iters} iterations, times {default_iters} for the default (not "
        f"run in full). Guard reverted: {stats['reverted'] or 'none'}. Block MSE {stats['mse_before']:.4g} -> "
        f"{stats['mse_after']:.4g} (random weights: not a quality figure). Layers: "
        + ", ".join(f"{n} {o}x{i}" for n, (o, i) in s["layers"].items()) + ".", "",
        "| total | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in totals), "",
        "Not measured: the teacher recording, the k-means of the other 27 blocks (counted as 28 x this one), "
        "loading and saving the model, a GPU."
        + ("" if s["peak_resets_per_stage"] else " Per-stage peaks accumulate (clear_refs refused).")]
    return "\n".join(lines) + "\n"


def main(args):
    shape = Shape(args.hidden, args.heads, 4.0, args.tokens)
    config = QuantizeConfig().validate()
    device = resolve_device(args.device)
    clock, shapes, stats = run_walk(args, config, shape, device)
    summary = summarise(args, config, shape, clock, shapes)
    text = markdown(args, config, summary, stats, device)
    write_text_atomic(args.out + ".md", text)
    write_text_atomic(args.out + ".json", json.dumps({"args": vars(args), "summary": summary}, indent=1) + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=DEFAULT_POINTS, help="calibration points M")
    parser.add_argument("--iters", type=int, default=20, help="training iterations (the default config: 500)")
    parser.add_argument("--hidden", type=int, default=1152, help="DiT-XL: 1152 (a test: a tiny block)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="T: 256 for 256x256 images (32x32 latents, patch 2)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="effective rate of the GPU estimate")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "block_xl"),
                        help="report path without extension (.md and .json are written)")
    main(parser.parse_args())
