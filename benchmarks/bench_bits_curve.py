"""FID against index bits per weight on the embedded digits model (issue 33): RTN, k-means, uniform VQ4DiT and
allocated VQ4DiT (`--bits B`) at 1 to 3 bits, each row measured as bench_recipes.py measures its rows.

    python benchmarks/bench_bits_curve.py --rows alloc-1,alloc-1.5,alloc-2,uniform-2 --resume
    python benchmarks/bench_bits_curve.py --rows alloc-1.5-seed1 --resume     # calibration seed 1
    python benchmarks/bench_bits_curve.py --rows kmeans-1,kmeans-2 --noise-only kmeans-1,kmeans-2 --resume
    python benchmarks/bench_bits_curve.py --resume --family 'alloc-res=--bits {bits} --residual 2' --rows alloc-res-1.5

A row is FAMILY-BITS[-seedN]. Families: rtn (2, 3 bits: round-to-nearest has no fractional setting), kmeans and
uniform (one setting for every Linear: 1 = k256 d8, 1.33 = k256 d6, 1.5 = k64 d4, 2 = k256 d4, 3 = k64 d2; k-means
codebooks only, or VQ4DiT's calibration), alloc (VQ4DiT with `--bits B`, any budget, one codebook per layer:
ONE_CODEBOOK_SETTINGS), allocsub (the same with a 0.5-bit setting, k256 d16, offered too: at 1 bit alloc has no
choice), allocres (`--bits B` at the default --bits-settings: those and two residual stages, k256 d16 x2 and k256 d8
x2); --family NAME=FLAGS adds one whose
quantize.py flags hold `{bits}`. -seedN sets the calibration seed (default: the sampling seed --seed).
Each row: quantize, 1000 samples (50 steps, CFG 1.5, sampling seed 0, the FP model's seeds), FID in the digits
classifier's space with a 95% paired-bootstrap interval of FID(row) - FID(FP), PSNR vs the FP samples, the noise
MSE vs FP on held-out teacher calls, quantize wall and CPU seconds, artifact size; --noise-only rows skip the
samples (a later run without them samples the artifact). Writes --out (runs/ and the report's base name):
bits_curve.md, bits_curve.json and bits_curve.png next to the folder.
"""
import argparse
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_quality import sample_cmd, sample_method, samples_path, timed  # noqa: E402
from benchmarks.bench_recipes import bootstrap_fids, held_out_calls, interval, measure_row  # noqa: E402
from benchmarks.plots import plot_bits_curve  # noqa: E402
from vq4dit.evaluation.report import evaluate_files  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402

# index bits -> (setting, quantize.py flags) of the uniform settings; 1.33 (d6) fits no Linear of the digits model
UNIFORM = {1.0: ("k256 d8", ["--wbits", "1", "--dim", "8"]),
           1.33: ("k256 d6", ["--dim", "6", "--codebook-size", "256"]),
           1.5: ("k64 d4", ["--dim", "4", "--codebook-size", "64"]),
           2.0: ("k256 d4", ["--wbits", "2", "--dim", "4"]),
           3.0: ("k64 d2", ["--wbits", "3", "--dim", "2"])}
RTN_BITS = (2.0, 3.0)
# alloc: --bits with one codebook per layer (the --bits-settings default before residual stages joined it)
ONE_CODEBOOK_SETTINGS = "256x8,256x6,64x4,256x4,64x2"
# allocsub: those and a 0.5-bit setting (k256 d16); at a budget of 1 bit the one-codebook settings leave no choice
# (every Linear at the cheapest, k256 d8: the uniform-1 row)
SUB_BIT_SETTINGS = "256x16,256x8,256x6,64x4,256x4,64x2"
ROW = re.compile(r"^(?P<family>[a-z][a-z0-9+_-]*?)-(?P<bits>\d+(\.\d+)?)(-seed(?P<seed>\d+))?$")
TARGET_ROWS = ["uniform-2", "allocres-2", "allocres-1.5", "allocres-1", "uniform-2-seed1", "allocres-2-seed1",
               "allocres-1.5-seed1", "allocres-1-seed1"]


@dataclass(frozen=True)
class RowSpec:
    key: str
    family: str
    bits: float
    seed: int | None  # the calibration seed; None: the sampling seed
    label: str
    flags: tuple


def family_flags(family, bits, custom):
    """(label, quantize.py flags) of `family` at `bits` index bits; custom {name: flags template with {bits}}."""
    if family in custom:
        return f"{family} {bits:g} bits", shlex.split(custom[family].replace("{bits}", f"{bits:g}"))
    if family == "alloc":
        return (f"VQ4DiT allocated {bits:g} bits, one codebook", ["--method", "vq4dit", "--bits", f"{bits:g}",
                                                                   "--bits-settings", ONE_CODEBOOK_SETTINGS])
    if family == "allocres":
        return (f"VQ4DiT allocated {bits:g} bits, + residual", ["--method", "vq4dit", "--bits", f"{bits:g}"])
    if family == "allocsub":
        return (f"VQ4DiT allocated {bits:g} bits, + k256 d16", ["--method", "vq4dit", "--bits", f"{bits:g}",
                                                                  "--bits-settings", SUB_BIT_SETTINGS])
    if family == "rtn":
        if bits not in RTN_BITS:
            raise ValueError(f"row rtn-{bits:g}: RTN has only integer settings here; valid bits: 2, 3")
        return f"RTN W{bits:g}", ["--method", "rtn", "--wbits", f"{bits:g}"]
    if family in ("kmeans", "uniform"):
        if bits not in UNIFORM:
            raise ValueError(f"row {family}-{bits:g}: no uniform setting of {bits:g} bits; valid: "
                             f"{', '.join(f'{b:g}' for b in UNIFORM)}")
        setting, flags = UNIFORM[bits]
        name, method = ("k-means", "kmeans") if family == "kmeans" else ("VQ4DiT uniform", "vq4dit")
        return f"{name} {setting}", ["--method", method, *flags]
    raise ValueError(f"row family {family!r}: valid: rtn, kmeans, uniform, alloc, allocres, allocsub"
                     f"{''.join(', ' + c for c in custom)}")


def parse_row(key, custom=None):
    """A row key FAMILY-BITS[-seedN] -> RowSpec (ValueError naming the key and what is valid)."""
    m = ROW.match(key)
    if m is None:
        raise ValueError(f"row {key!r}: expected FAMILY-BITS[-seedN], e.g. alloc-1.5 or uniform-2-seed1")
    bits = float(m["bits"])
    label, flags = family_flags(m["family"], bits, custom or {})
    seed = None if m["seed"] is None else int(m["seed"])
    if seed is not None:
        label, flags = f"{label}, seed {seed}", [*flags, "--seed", str(seed)]
    return RowSpec(key, m["family"], bits, seed, label, tuple(flags))


def parse_families(specs):
    """--family NAME=FLAGS values -> {name: flags template}."""
    out = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or "{bits}" not in flags or not re.fullmatch(r"[a-z][a-z0-9+_-]*", name):
            raise ValueError(f"--family {spec!r}: expected NAME=FLAGS with {{bits}} in FLAGS, "
                             "e.g. 'alloc-res=--bits {bits} --residual 2'")
        out[name] = flags
    return out


def settings(args):
    """What a row depends on: --resume keeps only rows measured with the same settings."""
    return {"num_samples": args.num_samples, "steps": args.steps, "seed": args.seed, "extra": args.extra}


def load_report(path, args):
    if not args.resume or not os.path.exists(path):
        return {"settings": settings(args), "rows": {}, "versus_fp": {}}
    with open(path) as f:
        saved = json.load(f)
    if saved["settings"] != settings(args):
        raise SystemExit(f"{path} was measured with {saved['settings']}, not {settings(args)}; "
                         "rerun without --resume (or with the same settings)")
    return saved


def main(args):
    try:
        custom = parse_families(args.family)
        specs = [parse_row(key, custom) for key in args.rows]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    stray = [key for key in args.noise_only if key not in args.rows]
    if stray:
        raise SystemExit(f"--noise-only {','.join(stray)}: not in --rows {','.join(args.rows)}")
    base = os.path.normpath(args.out)
    report = load_report(base + ".json", args)
    reference = samples_path(args.out, "fp")
    if not os.path.exists(reference):
        os.makedirs(os.path.dirname(reference), exist_ok=True)
        timed(sample_cmd(args, os.path.dirname(reference), []), os.path.dirname(reference) + ".sample.log")
    report["fp"] = evaluate_files(reference)
    for spec in specs:  # a row measured noise-only whose artifact is gone (runs/ deleted, another clone): measure anew
        row = report["rows"].get(spec.key)
        if row is not None and "fid" not in row and spec.key not in args.noise_only \
                and not os.path.isdir(os.path.join(args.out, "runs", spec.key)):
            del report["rows"][spec.key]
    todo = [s for s in specs if s.key not in report["rows"]]
    held_out = held_out_calls() if todo else None
    for spec in specs:
        row = report["rows"].get(spec.key)
        if row is None:
            row = measure_row(spec.key, spec.label, list(spec.flags), args, reference, held_out,
                              sample=spec.key not in args.noise_only)
            row = {**row, "family": spec.family, "index_bits": spec.bits, "calib_seed": spec.seed}
        elif "fid" not in row and spec.key not in args.noise_only:  # measured noise-only before: sample it now
            row = {**row, **sample_method(spec.key, args, reference)}
        else:
            continue
        report["rows"][spec.key] = row
        print(json.dumps(row), flush=True)
        write_report(report, args.out, base)  # after every row: a stopped run keeps what it measured
    write_report(report, args.out, base)


def write_report(report, out, base):
    rows = report["rows"]
    boot = bootstrap_fids(rows, out)
    # a row whose samples were deleted keeps its recorded interval (the index sets depend only on the seed)
    report["versus_fp"] = {**report["versus_fp"], **{k: interval(boot, k, "fp") for k in rows if k in boot}}
    write_text_atomic(base + ".json", json.dumps(report, indent=1))
    write_text_atomic(base + ".md", "\n".join(table_lines(report) + target_lines(report)) + "\n")
    plot_bits_curve(curve_series(rows), report["fp"]["fid"], base + ".png")


def ordered(rows):
    families = ["rtn", "kmeans", "uniform", "alloc", "allocsub"]
    return sorted(rows.values(), key=lambda r: (families.index(r["family"]) if r["family"] in families else 9,
                                                r["family"], r["index_bits"], r["calib_seed"] or 0))


def table_lines(report):
    s, fp = report["settings"], report["fp"]
    lines = ["# FID against index bits per weight (embedded digits DiT)", "",
             f"Command: `python benchmarks/bench_bits_curve.py{''.join(' ' + shlex.quote(a) for a in sys.argv[1:])}`"
             f" (the last run; rows accumulate with --resume). {s['num_samples']} samples per row, {s['steps']} "
             f"steps, CFG 1.5, sampling seed {s['seed']} for every row; FID in the digits classifier's space (FP: "
             f"{fp['fid']:.1f}); FID - FID(FP): 95% paired bootstrap, 200 resamples (0 inside: within the sampling "
             "noise of FP). Noise MSE: predicted eps vs FP on held-out teacher calls (16 trajectories x 10 steps, "
             "seed 1000). Quantize: the whole quantize.py process, wall (CPU) seconds, on a 2-core CPU shared with "
             f"other jobs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.", "",
             "| row | key | index bits | bits/weight (+codebook) | FID | FID - FID(FP), 95% | PSNR vs FP (dB) | "
             "noise MSE | quantize s (CPU s) | artifact MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ordered(report["rows"]):
        if "fid" in r:
            lo, hi = report["versus_fp"][r["key"]]
            fid = f"{r['fid']:.1f} | [{lo:+.1f}, {hi:+.1f}] | {r['psnr_vs_reference']:.2f}"
        else:
            fid = "not sampled | - | -"
        cpu = "" if r.get("quantize_cpu_s") is None else f" ({r['quantize_cpu_s']:.0f})"
        lines.append(f"| {r['method']} | {r['key']} | {r['index_bits']:g} | {r['bits_per_weight']:.2f} "
                     f"({r['bits_per_weight_with_codebook']:.2f}) | {fid} | {r['noise_mse']:.4g} | "
                     f"{r['quantize_s']:.0f}{cpu} | {r['artifact_mib']:.2f} |")
    return lines


def target_lines(report):
    """Issue 33's targets, per calibration seed and allocation family (allocres: the default --bits-settings; alloc:
    one codebook per layer), for the rows measured so far."""
    rows, fp = report["rows"], report["fp"]["fid"]
    lines = ["", "Targets (issue 33), per calibration seed:", ""]
    for suffix, family in [(s, f) for s in ("", "-seed1") for f in ("allocres", "alloc")]:
        seed = "1" if suffix else "0 (--seed)"
        key = f"{family}-1.5{suffix}"
        if "fid" in rows.get(key, {}):
            lo, hi = report["versus_fp"][key]
            lines.append(f"- {'met' if lo <= 0 <= hi else 'NOT met'}: seed {seed}, 1.5 bits ({key}): FID - FID(FP) in "
                         f"[{lo:+.1f}, {hi:+.1f}]; target: 0 inside (within the sampling noise of FP)")
        one_bit = (f"{family}-1{suffix}",) + ((f"allocsub-1{suffix}",) if family == "alloc" else ())
        for key in one_bit:  # alloc-1 is uniform k256 d8 (no cheaper one-codebook setting): allocsub offers d16
            if "fid" in rows.get(key, {}):
                ratio = rows[key]["fid"] / fp
                lines.append(f"- {'met' if ratio <= 1.2 else 'NOT met'}: seed {seed}, 1 bit ({key}): FID "
                             f"{rows[key]['fid']:.1f} = {ratio:.2f} x FP's {fp:.1f}; target <= 1.2 x")
        alloc, uniform = rows.get(f"{family}-2{suffix}"), rows.get(f"uniform-2{suffix}")
        if alloc and uniform:
            noise = alloc["noise_mse"] / uniform["noise_mse"]
            wall = alloc["quantize_s"] / uniform["quantize_s"]
            cpu = (alloc.get("quantize_cpu_s") or float("nan")) / (uniform.get("quantize_cpu_s") or float("nan"))
            lines.append(f"- {'met' if noise <= 0.7 and cpu <= 1.2 else 'NOT met'}: seed {seed}, 2 bits "
                         f"({family}-2{suffix}): noise MSE {noise:.2f} x uniform W2's (target <= 0.7 x) at {cpu:.2f} "
                         f"x its quantize CPU seconds, {wall:.2f} x its wall seconds (target <= 1.2 x)")
    return lines


def curve_series(rows):
    """{family label: [(bits/weight with codebooks, FID or None, noise MSE)]} of the rows at the default
    calibration seed."""
    names = {"rtn": "RTN", "kmeans": "k-means", "uniform": "VQ4DiT uniform", "alloc": "VQ4DiT allocated, one codebook",
             "allocsub": "VQ4DiT allocated, + k256 d16", "allocres": "VQ4DiT allocated, + residual (default)"}
    series = {}
    for r in ordered(rows):
        if r["calib_seed"] is None:
            series.setdefault(names.get(r["family"], r["family"]), []).append(
                (r["bits_per_weight_with_codebook"], r.get("fid"), r["noise_mse"]))
    return series


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=lambda s: s.split(","), default=TARGET_ROWS,
                        help=f"comma list of FAMILY-BITS[-seedN] (default: the rows the targets name, {TARGET_ROWS})")
    parser.add_argument("--family", action="append", default=[],
                        help="NAME=FLAGS: one more row family, its quantize.py flags holding {bits}")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and the default calibration seed)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="keep the rows the report already holds")
    parser.add_argument("--noise-only", type=lambda s: s.split(","), default=[],
                        help="comma list of rows to quantize and score by noise MSE only, not sampled (no FID); "
                             "a later run without them in this list samples their artifacts")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bits_curve"))
    parser.add_argument("extra", nargs="*", help="quantize.py flags for every row after --, e.g. for a smoke test: "
                                                 "-- --iters 5 --calib-samples 2 --steps 5 --calib-timesteps 2")
    main(parser.parse_args())
