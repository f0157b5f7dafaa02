"""Calibration benchmark on the embedded digits DiT: k-means only vs VQ4DiT and its variants.

For every variant: k-means (cached per codebook shape and candidate count), calibration, then on held-out
teacher inputs (a different seed from the calibration's) the predicted-noise MSE vs the FP model and the
per-block output MSE along the quantized chain. Also times the default pipeline run (k-means + calibration
+ save) and writes benchmarks/results/calib.md.

    OMP_NUM_THREADS=2 python benchmarks/bench_calib.py                 # everything (~20 min on 2 cores)
    python benchmarks/bench_calib.py --only w2-kmeans w2-vq4dit        # a subset
"""
import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import yaml  # noqa: E402

from vq4dit.calib.cache import ActivationStore  # noqa: E402
from vq4dit.calib.capture import Schedule, capture, capture_model_inputs, step_filter  # noqa: E402
from vq4dit.calib.metrics import chain_errors, prediction_mse  # noqa: E402
from vq4dit.calib.problem import Problem  # noqa: E402
from vq4dit.calib.teacher import recorded_rows, teacher_plan  # noqa: E402
from vq4dit.jobs.config import load_config  # noqa: E402
from vq4dit.jobs.methods import method_for  # noqa: E402
from vq4dit.jobs.quantize import Run, quantize, record_and_calibrate  # noqa: E402
from vq4dit.models.adapters import adapter_for  # noqa: E402
from vq4dit.models.loading import load_dit  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq import CodebookSpec, quantize_linears  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"w2": "digits_w2", "w3": "digits_w3"}
# name -> (preset, overrides); "kmeans" and "codebook" are the baselines the calibration must beat
VARIANTS = {
    "w2-kmeans": ("w2", {"method": "kmeans"}),
    "w2-codebook": ("w2", {"method": "codebook"}),
    "w2-vq4dit": ("w2", {}),
    "w2-vq4dit-fp-inputs": ("w2", {"block_inputs": "fp"}),
    "w2-vq4dit-joint": ("w2", {"calib": "joint"}),
    "w2-vq4dit-n1": ("w2", {"candidates": 1}),
    "w2-vq4dit-n3": ("w2", {"candidates": 3}),
    "w2-vq4dit-lambda0": ("w2", {"lambda_r": 0.0}),
    "w2-vq4dit-lambda0.1": ("w2", {"lambda_r": 0.1}),
    "w2-vq4dit-lambda1": ("w2", {"lambda_r": 1.0}),
    "w2-vq4dit-paper-lr": ("w2", {"ratio_reg": "paper"}),  # L_r = mean(1 - |2r - 1|), the paper's text
    "w2-vq4dit-samples16": ("w2", {"calib_samples": 16}),
    "w2-vq4dit-iters250": ("w2", {"iters": 250}),
    "w3-kmeans": ("w3", {"method": "kmeans"}),
    "w3-codebook": ("w3", {"method": "codebook"}),
    "w3-vq4dit": ("w3", {}),
}
HELD_OUT_SEED_OFFSET = 1000  # held-out teacher inputs: seed + offset, so never the calibration trajectories


def held_out(teacher, config, device, samples=16, timesteps=10):
    """Held-out teacher points (another seed than calibration's): the model's inputs, and the recorded block calls."""
    adapter = adapter_for(teacher)
    config = config.replace(calib_samples=samples, calib_timesteps=timesteps,
                                 seed=config.seed + HELD_OUT_SEED_OFFSET)
    plan = teacher_plan(config.teacher, config.seed)
    keep = step_filter(plan.steps, timesteps)
    calls = capture_model_inputs(teacher, adapter.teacher_runs(teacher, plan, device), keep, progress=False)
    rows = recorded_rows(plan, timesteps, adapter.rows_per_trajectory(plan))
    schedule = Schedule(adapter.teacher_runs(teacher, plan, device), keep, rows)
    cset = capture(teacher, adapter.blocks(teacher), schedule, ActivationStore(), progress=False)
    return calls, cset


def cache_bytes(points, tokens, hidden, dtype_bytes=2):
    """Bytes of one (points, tokens, hidden) activation tensor."""
    return points * tokens * hidden * dtype_bytes


def kmeans_student(teacher, config, cache):
    """A deep copy of the k-means-quantized student for (k, d, n, seed); k-means runs once per key."""
    c = config.codebooks
    n = c.candidates if config.method == "vq4dit" else 1
    key = (c.k, c.dim, n, config.seed, c.kmeans_iters)
    if key not in cache:
        student = copy.deepcopy(teacher)
        start = time.perf_counter()
        # hard, as the quantize job builds them (jobs/methods.py): calibration softens a block's layers when it
        # reaches them, after the output-aware refit when the config asks for it
        spec = CodebookSpec(c.k, c.dim, n, c.kmeans_iters, ratio_init=c.ratio_init)
        quantize_linears(student, spec, seed=config.seed, progress=False, soft=False)
        cache[key] = (student, time.perf_counter() - start)
    student, seconds = cache[key]
    student = copy.deepcopy(student)
    qlayers = {name: m for name, m in student.named_modules() if type(m).__name__ == "VQLinear"}
    return student, qlayers, seconds


def run_variant(name, teacher, base, overrides, evalset, cache, device):
    config = base.replace(**overrides).validate()
    student, qlayers, kmeans_s = kmeans_student(teacher, config, cache)
    start = time.perf_counter()
    if config.method == "kmeans":
        for layer in qlayers.values():
            layer.harden()
    else:
        method = method_for(config.method, config.codebooks, config.seed)
        problem = Problem(student, teacher, adapter_for(student), qlayers, method.prepare, config.seed, False,
                          needs_moments=config.output_aware)
        with tempfile.TemporaryDirectory() as out_dir:
            record_and_calibrate(problem, Run.open(config, out_dir, progress=False))
    calib_s = time.perf_counter() - start
    calls, cset = evalset
    blocks = chain_errors(list(student.blocks), list(teacher.blocks), cset, device)
    c, cal = config.codebooks, config.calibration
    row = {"variant": name, "wbits": c.wbits, "k": c.k, "d": c.dim, "method": config.method,
           "calib": cal.calib if config.method != "kmeans" else "-", "inputs": cal.block_inputs,
           "n": c.candidates if config.method == "vq4dit" else 1, "lambda_r": cal.lambda_r,
           "threads": torch.get_num_threads(), "kmeans_s": kmeans_s, "calib_s": calib_s,
           "noise_mse": prediction_mse(student, teacher, adapter_for(teacher), calls, device),
           "block_mse_mean": sum(blocks) / len(blocks), "block_mse_last": blocks[-1], "block_mse": blocks}
    logging.info("%s: noise MSE %.4g, last block MSE %.4g, calib %.1f s", name, row["noise_mse"],
                 row["block_mse_last"], calib_s)
    return row


def time_default_run(preset, overrides):
    """Wall time of the whole default pipeline (load, k-means, calibration, save) for a preset."""
    config = load_config(preset, overrides)
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        quantize(config, out_dir, progress=False)
        return time.perf_counter() - start, config


def report(rows, default_s, default_config, threads, command):
    fmt = "| {variant} | {method} | {calib} | {inputs} | {n} | {lambda_r:g} | {threads} | {kmeans_s:.1f} | " \
          "{calib_s:.1f} | {noise_mse:.4g} | {block_mse_mean:.4g} | {block_mse_last:.4g} |"
    teacher = load_config().teacher  # the defaults' trajectories and kept steps
    points = teacher.calib_samples * 2 * teacher.calib_timesteps
    xl = cache_bytes(points, 256, 1152)
    timing = [] if default_s is None else [
        f"Default W2 pipeline run (`digits_w2`: load + k-means + calibration + save): "
        f"**{default_s:.1f} s** (iters {default_config.calibration.iters}, calib_samples "
        f"{default_config.teacher.calib_samples}, calib_timesteps {default_config.teacher.calib_timesteps}, steps "
        f"{default_config.teacher.steps}).", ""]
    lines = [
        "# Calibration benchmark (embedded digits DiT)", "",
        f"Command: `OMP_NUM_THREADS={threads} python benchmarks/bench_calib.py{command}`; torch {torch.__version__}, "
        f"{threads} threads, {platform.processor() or platform.machine()}. Wall times depend on what else runs "
        "on the machine (rows were measured while other jobs shared the 2 cores).", "", *timing,
        "Errors vs the FP model on held-out teacher inputs (16 trajectories x 10 steps x CFG 2, seed + "
        f"{HELD_OUT_SEED_OFFSET}): `noise MSE` of the predicted eps, per-block output MSE along the quantized "
        "chain (mean over blocks and last block). k-means time is shared by variants with the same (k, d, n).", "",
        "| variant | method | calib | block inputs | n | lambda_r | threads | k-means s | calib s | noise MSE | "
        "block MSE mean | block MSE last |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[fmt.format(**{"threads": 1, **r}) for r in rows], "",  # rows of runs before the column: 1 thread
        "## Activation memory at the defaults for DiT-XL/2", "",
        f"M = {teacher.calib_samples} trajectories x 2 (CFG) x {teacher.calib_timesteps} steps = {points} points, "
        "T = 256, D = 1152, fp16: one (M, T, D) tensor "
        f"= {xl / 2**20:.0f} MiB. Sequential block-wise holds two (block input, target): {2 * xl / 2**30:.2f} GiB "
        f"(+ c, 7 MiB); the resumable state on disk is the same two tensors. Joint keeps only the block-0 "
        f"inputs ({xl / 2**20:.0f} MiB) and recomputes FP targets per minibatch; storing every block's "
        f"target would take 28 x {xl / 2**20:.0f} MiB = {28 * xl / 2**30:.1f} GiB.", "",
    ]
    return "\n".join(lines)


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = torch.get_num_threads()
    names = args.only or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    default_s, default_config = time_default_run(PRESETS["w2"], overrides) if args.time_default else (None, None)
    logging.info("default W2 pipeline run: %s s", default_s)
    # per-layer lines: the JSON results hold what matters here
    for name in ("vq4dit.calib.blockwise", "vq4dit.calib.joint"):
        logging.getLogger(name).setLevel(logging.WARNING)
    bases = {key: load_config(path, overrides).replace(device="cpu")
             for key, path in PRESETS.items()}
    teacher, _ = load_dit(bases["w2"].model.model, bases["w2"].model.ckpt, device="cpu")
    evalset = held_out(teacher, bases["w2"], "cpu")
    json_path = os.path.splitext(args.out)[0] + ".json"
    rows = []
    if args.resume and os.path.exists(json_path):  # keep the variants an earlier (interrupted) run finished
        with open(json_path) as f:
            rows = [r for r in json.load(f) if r["variant"] in names]
    command = "".join(f" {a}" for a in sys.argv[1:])
    cache = {}
    for name in names:
        if any(r["variant"] == name for r in rows):
            continue
        preset, var_overrides = VARIANTS[name]
        rows.append(run_variant(name, teacher, bases[preset], var_overrides, evalset, cache, "cpu"))
        rows.sort(key=lambda r: names.index(r["variant"]))
        # written after every variant, so a killed run loses at most one variant (rerun with --resume)
        write_text_atomic(json_path, json.dumps(rows, indent=1) + "\n")
        write_text_atomic(args.out, report(rows, default_s, default_config, threads, command))
    write_text_atomic(args.out, report(rows, default_s, default_config, threads, command))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help=f"variants to run (default: all): {', '.join(VARIANTS)}")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. iters=200 calib_samples=16")
    parser.add_argument("--no-default-run", dest="time_default", action="store_false",
                        help="skip timing the whole default W2 pipeline run")
    parser.add_argument("--resume", action="store_true", help="skip variants already in the results JSON")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "calib.md"))
    main(parser.parse_args())
