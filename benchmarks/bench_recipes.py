"""The authors' recipe against ours on the embedded digits model (issue 11): same model, same sampling seeds.

    python benchmarks/bench_recipes.py                # the default rows (~75 min on 2 cores); --resume goes on
    python benchmarks/bench_recipes.py --resume --rows authors,authors-seed1   # their full budget (80 min each)
    python benchmarks/bench_recipes.py --resume --rows ours-5x,ours-5x-seed1   # ours at 5x its time (~14 min each)
    python benchmarks/bench_recipes.py --resume --rows ours                    # all measured: rewrites the report only

With --resume, rows may run in separate processes at once: each merges its row into recipes.json under a lock,
so none is lost (their wall times are then not comparable with rows measured alone; on this 2-core CPU two
authors' runs at OMP_NUM_THREADS=1 each took 12 s per trajectory against 4.8 s for one alone, so run them in
sequence here). An interrupted row goes on where its calibration stopped (quantize.py resumes from the state in
its --out); its quantize time is the sum of the runs, marked in the table. To interrupt a row, kill its python
quantize.py process (`pkill -f '^[^ ]*python quantize.py'`), not /usr/bin/time, which must log the run's time.

Rows: k-means only, codebook-only, our recipe (calibration seeds 0 and 1), the authors' recipe at a tenth of its
default budget (100 trajectories) and at the wall time of our default run (as many trajectories as fit, from the
measured cost per trajectory), each with calibration seeds 0 and 1; their full budget of 1000 trajectories on
request, and ours at 5x its iterations and calibration points (about the 100-trajectory rows' time) on request;
the CFG ablation too: each recipe with the other's CFG scale for its calibration data (rows ours-cfg4,
ours-cfg4-seed1, authors-100-cfg15, authors-100-cfg15-seed1; ~40 min for the four), and ours with both changes
(ours-5x-cfg4, ours-5x-cfg4-seed1).
Each is quantized and sampled in its own process through the CLIs (wall
time from /usr/bin/time), 1000 samples, 50 steps, CFG 1.5, sampling seed 0 for every row; then: FID (digits
classifier features), a paired-bootstrap 95% interval of FID(row) - FID(ours, seed 0), paired PSNR vs the FP
samples, and the noise MSE vs the FP model on held-out teacher inputs (16 trajectories x 10 steps at CFG 1.5,
another seed than any calibration). Writes recipes.md and recipes.json under --out.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from benchmarks.bench_quality import last_method, quantize_method, sample_cmd, sample_method, samples_path, timed  # noqa: E402
from benchmarks.fid_bootstrap import paired_bootstrap  # noqa: E402
from vq4dit.calib.capture import capture_model_inputs, step_filter  # noqa: E402
from vq4dit.calib.metrics import prediction_mse  # noqa: E402
from vq4dit.calib.teacher import teacher_plan  # noqa: E402
from vq4dit.evaluation.digits import classifier_outputs, load_digits_classifier, real_digits_uint8  # noqa: E402
from vq4dit.evaluation.samples import load_samples  # noqa: E402
from vq4dit.jobs.config import load_config  # noqa: E402
from vq4dit.models.adapters import adapter_for  # noqa: E402
from vq4dit.models.loading import load_dit  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq import load_quantized  # noqa: E402

AUTHORS_BUDGET = 1000  # trajectories: the authors' default (80 min per run, measured, on this 2-core CPU)
SHORT_BUDGET = 100  # a tenth of it: what fits beside the other rows in a session here
# ours given about the wall time of the 100-trajectory authors' rows: iterations and teacher trajectories both
# scaled from quantize.py's defaults, so each cached point is still seen as often as in the default run
# (500 iters x 16 / (64 x 12 x 2) = 5.2 times)
OURS_SCALE = 5
OURS_DEFAULT = load_config()
OURS_SCALED = ["--iters", str(OURS_DEFAULT.calibration.iters * OURS_SCALE),
               "--calib-samples", str(OURS_DEFAULT.teacher.calib_samples * OURS_SCALE)]
# key -> (label, quantize.py flags); "{matched}" is filled with the trajectories that fit our default's wall time
ROWS = {
    "kmeans": ("k-means only (no calibration)", ["--method", "kmeans"]),
    "codebook": ("codebook-only (PQF-style)", ["--method", "codebook"]),
    "ours": ("ours: block-wise, cached points (default)", []),
    "ours-seed1": ("ours, calibration seed 1", ["--seed", "1"]),
    "authors-matched": ("authors' recipe at our wall time", ["--recipe", "authors", "--calib-samples", "{matched}"]),
    "authors-matched-seed1": ("authors' recipe at our wall time, seed 1",
                              ["--recipe", "authors", "--calib-samples", "{matched}", "--seed", "1"]),
    "authors-100": (f"authors' recipe, {SHORT_BUDGET} trajectories", ["--recipe", "authors", "--calib-samples",
                                                                       str(SHORT_BUDGET)]),
    "authors-100-seed1": (f"authors' recipe, {SHORT_BUDGET} trajectories, seed 1",
                          ["--recipe", "authors", "--calib-samples", str(SHORT_BUDGET), "--seed", "1"]),
    "ours-5x": (f"ours, {OURS_SCALE}x iterations and points", OURS_SCALED),
    "ours-5x-seed1": (f"ours, {OURS_SCALE}x iterations and points, seed 1", OURS_SCALED + ["--seed", "1"]),
    # one of the six differences swapped: the teacher's CFG scale for the calibration data (ours 1.5, theirs 4.0)
    "ours-cfg4": ("ours, calibration data at CFG 4.0", ["--cfg-scale", "4.0"]),
    "ours-cfg4-seed1": ("ours, calibration data at CFG 4.0, seed 1", ["--cfg-scale", "4.0", "--seed", "1"]),
    "authors-100-cfg15": (f"authors' recipe, {SHORT_BUDGET} trajectories, data at CFG 1.5",
                          ["--recipe", "authors", "--calib-samples", str(SHORT_BUDGET), "--cfg-scale", "1.5"]),
    "authors-100-cfg15-seed1": (f"authors' recipe, {SHORT_BUDGET} trajectories, data at CFG 1.5, seed 1",
                                ["--recipe", "authors", "--calib-samples", str(SHORT_BUDGET), "--cfg-scale", "1.5",
                                 "--seed", "1"]),
    "ours-5x-cfg4": (f"ours, {OURS_SCALE}x iterations and points, data at CFG 4.0",
                     OURS_SCALED + ["--cfg-scale", "4.0"]),
    "ours-5x-cfg4-seed1": (f"ours, {OURS_SCALE}x iterations and points, data at CFG 4.0, seed 1",
                           OURS_SCALED + ["--cfg-scale", "4.0", "--seed", "1"]),
    # issue 19: the default against the FP model and the levers one at a time (--out benchmarks/results/levers)
    "paper-init": ("k-means start (codebook_init kmeans, the paper's; the default before issue 19)",
                   ["--codebook-init", "kmeans", "--method", "vq4dit"]),
    "paper-init-seed1": ("k-means start, seed 1", ["--codebook-init", "kmeans", "--method", "vq4dit", "--seed", "1"]),
    "ours-e2e": ("ours + end-to-end pass, 300 updates", ["--e2e-iters", "300"]),
    "ours-e2e-seed1": ("ours + end-to-end pass, 300 updates, seed 1", ["--e2e-iters", "300", "--seed", "1"]),
    "w3": ("W3 (k64 d2), default", ["--wbits", "3", "--dim", "2"]),
    "w3-seed1": ("W3 (k64 d2), default, seed 1", ["--wbits", "3", "--dim", "2", "--seed", "1"]),
    "w3-paper-init": ("W3 (k64 d2), k-means start", ["--wbits", "3", "--dim", "2", "--codebook-init", "kmeans",
                                                     "--method", "vq4dit"]),
    "authors": (f"authors' recipe, {AUTHORS_BUDGET} trajectories (their default)", ["--recipe", "authors"]),
    "authors-seed1": (f"authors' recipe, {AUTHORS_BUDGET} trajectories, seed 1",
                      ["--recipe", "authors", "--seed", "1"]),
}
DEFAULT_ROWS = ["kmeans", "codebook", "ours", "authors-100", "authors-matched", "ours-seed1", "authors-matched-seed1",
                "authors-100-seed1"]
REFERENCE = "ours"
# FID(a) - FID(b) reported for these pairs too: ours at 5x its time against the authors' rows that cost about as
# much (100 trajectories) and against their full budget, calibration seed with seed; the CFG ablation
PAIRS = [("ours-5x", "authors-100"), ("ours-5x-seed1", "authors-100-seed1"), ("ours-5x", "authors"),
         ("ours-5x-seed1", "authors-seed1"),
         # the CFG ablation, each against the same recipe and seed with its own data scale
         ("ours-cfg4-seed1", "ours-seed1"), ("authors-100-cfg15", "authors-100"),
         ("authors-100-cfg15-seed1", "authors-100-seed1"),
         # both changes to ours at once, against the authors' rows of about its cost
         ("ours-5x-cfg4", "authors-100"), ("ours-5x-cfg4-seed1", "authors-100-seed1"),
         ("ours-5x-cfg4", "authors"), ("ours-5x-cfg4-seed1", "authors-seed1")]
UNCALIBRATED = ("kmeans", "rtn")  # methods without a calibration (no calib_log.jsonl)
HELD_OUT = dict(calib_samples=16, calib_timesteps=10, seed=1000, cfg_scale=1.5)


def held_out_calls():
    teacher, _ = load_dit(None, None)
    config = load_config().replace(**HELD_OUT)
    adapter = adapter_for(teacher)
    plan = teacher_plan(config.teacher, config.seed)
    calls = capture_model_inputs(teacher, adapter.teacher_runs(teacher, plan, "cpu"),
                                 step_filter(config.teacher.steps, config.teacher.calib_timesteps), progress=False)
    return teacher, adapter, calls


def matched_trajectories(rows):
    """Authors' trajectories that fit in our default's calibration time: the fixed cost of a quantize run (load,
    k-means, save: the k-means-only row) comes off both, the rest is divided by the measured cost per trajectory
    of the longest authors' run so far."""
    fixed = rows["kmeans"]["quantize_s"]
    runs = [rows[k] for k in ("authors", "authors-100") if k in rows]
    if not runs:
        raise SystemExit("authors-matched needs an authors' run first (authors-100 or authors) and the kmeans row")
    per_trajectory = (runs[0]["quantize_s"] - fixed) / runs[0]["trajectories"]
    return max(1, math.floor((rows["ours"]["quantize_s"] - fixed) / per_trajectory))


def bootstrap_intervals(rows, out, resamples=200):
    """(FID(row) - FID(REFERENCE), FID(a) - FID(b) for PAIRS, FID(row) - FID(FP)): 95% paired-bootstrap intervals
    {key: [lo, hi]}. A row whose samples were deleted (they take disk) keeps the intervals recorded in recipes.json
    while they existed: the resampled index sets depend only on the seed, so they are the same."""
    saved = saved_report(os.path.join(out, "recipes.json"))
    boot = bootstrap_fids(rows, out, resamples)
    present = [key for key in rows if key in boot]
    intervals = {key: interval(boot, key, REFERENCE) for key in present} if REFERENCE in present else {}
    pairs = {f"{a} - {b}": interval(boot, a, b) for a, b in PAIRS if a in present and b in present}
    versus_fp = {key: interval(boot, key, "fp") for key in present}
    return ({**saved.get("intervals", {}), **intervals}, {**saved.get("pairs", {}), **pairs},
            {**saved.get("versus_fp", {}), **versus_fp})


def bootstrap_fids(keys, out, resamples=200):
    """{key: (resamples,) FIDs} of the rows `keys` whose samples are under `out`, and of "fp", on the same resampled
    index sets (seed 0: they depend only on it, so adding a key leaves the other intervals unchanged)."""
    present = [key for key in keys if os.path.exists(samples_path(out, key))]
    classifier = load_digits_classifier()
    real, _ = classifier_outputs(classifier, real_digits_uint8()[0])
    features = {key: classifier_outputs(classifier, load_samples(samples_path(out, key))[0])[0]
                for key in [*present, "fp"]}
    return paired_bootstrap(features, real, resamples, seed=0)


def interval(boot, a, b):
    """95% interval [lo, hi] of FID(a) - FID(b) over the same resampled indices."""
    return [float(v) for v in np.percentile(boot[a] - boot[b], [2.5, 97.5])]


def saved_report(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_report(rows, out, args):
    intervals, pairs, versus_fp = bootstrap_intervals(rows, out)
    lines = [
        "# The authors' recipe vs ours (embedded digits DiT, W2: k = 256, d = 4)", "",
        f"Command: `python benchmarks/bench_recipes.py{''.join(' ' + a for a in sys.argv[1:])}`. "
        f"{args.num_samples} samples per row, {args.steps} steps, CFG 1.5, sampling seed {args.seed} for every "
        "row (sample i starts from the same noise everywhere). FID in the digits classifier's feature space; the "
        f"interval is a paired bootstrap (200 resamples) of FID(row) - FID({ROWS[REFERENCE][0]}), and of FID(row) - "
        "FID(full precision) (the same samples' FP counterparts; 0 inside: within the noise of FP). Noise MSE: "
        "predicted eps vs the FP model on held-out teacher inputs (16 trajectories x 10 steps, CFG 1.5, seed "
        "1000). Quantize s: the whole quantize.py process (load, k-means, calibration, save) on this 2-core CPU.",
        "",
        "| row | updates | FID | FID - FID(ours), 95% | FID - FID(FP), 95% | PSNR vs FP (dB) | noise MSE | accuracy "
        "| quantize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows, key=list(ROWS).index):  # the order of ROWS, whichever process measured a row first
        r, iv = rows[key], intervals.get(key)
        interval = "-" if key == REFERENCE or iv is None else f"[{iv[0]:+.1f}, {iv[1]:+.1f}]"
        psnr = "-" if r["psnr_vs_reference"] is None else f"{r['psnr_vs_reference']:.2f}"
        fp_lo, fp_hi = versus_fp[key]
        lines.append(f"| {r['method']} | {r.get('updates') or '-'} | {r['fid']:.1f} | {interval} | "
                     f"[{fp_lo:+.1f}, {fp_hi:+.1f}] | {psnr} | "
                     f"{r['noise_mse']:.4g} | {r['accuracy']:.3f} | {r['quantize_s']:.0f}{resumed(r)} |")
    if pairs:
        lines += ["", "FID between other rows, same paired bootstrap (negative = the first row is better):", "",
                  "| first row | second row | FID(first) - FID(second), 95% |", "|---|---|---|"]
        for (a, b) in PAIRS:
            if f"{a} - {b}" in pairs:
                lo, hi = pairs[f"{a} - {b}"]
                lines.append(f"| {rows[a]['method']} ({rows[a]['quantize_s']:.0f} s) | {rows[b]['method']} "
                             f"({rows[b]['quantize_s']:.0f} s) | [{lo:+.1f}, {hi:+.1f}] |")
    write_text_atomic(os.path.join(out, "recipes.md"), "\n".join(lines) + "\n")
    write_text_atomic(os.path.join(out, "recipes.json"),
                      json.dumps({"rows": rows, "intervals": intervals, "pairs": pairs, "versus_fp": versus_fp},
                                 indent=1))


def resumed(row):
    n = row.get("quantize_segments", 1)
    return f" ({n} runs, resumed)" if n > 1 else ""


def updates_of(artifact):
    """Optimizer updates of a calibration (online: one per teacher step; block-wise: iters per block)."""
    with open(os.path.join(artifact, "calib_log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    if records and records[0].get("mode") == "online":  # one record per block, each with the run's total
        return records[0]["updates"]
    with open(os.path.join(artifact, "config.yaml")) as f:
        iters = yaml.safe_load(f)["iters"]
    return sum(r.get("updates", iters) for r in records)  # block-wise records hold their own (plateau: fewer)


def measure_row(key, label, flags, args, reference, held_out, sample=True):
    """One row: quantize with `flags`, the noise MSE vs the FP model on the held-out calls `held_out`
    (held_out_calls()) and the calibration's optimizer updates; then, unless `sample` is False, sample and evaluate
    against the FP samples `reference` (bench_quality.sample_method)."""
    row = quantize_method(key, args, label, flags)
    art = os.path.join(args.out, "runs", key)
    model, _, _ = load_quantized(art)
    row["noise_mse"] = prediction_mse(model, *held_out, "cpu")
    row["updates"] = 0 if last_method(flags) in UNCALIBRATED else updates_of(art)
    row["flags"] = flags
    return {**row, **sample_method(key, args, reference)} if sample else row


def main(args):
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    path = os.path.join(args.out, "recipes.json")
    rows = saved_rows(path, args.resume)
    reference = samples_path(args.out, "fp")
    if not os.path.exists(reference):
        timed(sample_cmd(args, os.path.dirname(reference), []), os.path.dirname(reference) + ".sample.log")
    todo = [key for key in args.rows if key not in rows]
    if not todo:  # every row measured: rewrite the report (e.g. after a change to it) without running anything
        with locked(path + ".lock"):
            write_report(saved_rows(path, True), args.out, args)
        return
    teacher, adapter, calls = held_out_calls()
    for key in todo:
        label, flags = ROWS[key]
        if "{matched}" in flags:
            flags = [f.format(matched=matched_trajectories(rows)) for f in flags]
        row = measure_row(key, label, flags, args, reference, (teacher, adapter, calls))
        if "--recipe" in flags:
            row["trajectories"] = int(flags[flags.index("--calib-samples") + 1]) if "--calib-samples" in flags \
                else AUTHORS_BUDGET
        print(json.dumps(row), flush=True)
        with locked(path + ".lock"):  # another process may have added rows meanwhile: merge, don't overwrite
            rows = {**saved_rows(path, args.resume), **rows, key: row}
            write_report(rows, args.out, args)


@contextlib.contextmanager
def locked(lock_path):
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def saved_rows(path, resume):
    return saved_report(path).get("rows", {}) if resume else {}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and the default calibration seed)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--rows", type=lambda s: s.split(","), default=DEFAULT_ROWS,
                        help=f"comma list of {list(ROWS)} (default {DEFAULT_ROWS})")
    parser.add_argument("--resume", action="store_true", help="keep the rows recipes.json already holds")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "recipes"))
    parser.add_argument("extra", nargs="*", help="quantize.py flags for every row after --, e.g. for a smoke test: "
                                                 "-- --iters 5 --calib-samples 2 --steps 5 --calib-timesteps 2")
    main(parser.parse_args())
