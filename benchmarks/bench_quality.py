"""Quality, size and cost of every method on the embedded digits model, all through the CLIs users run.

    python benchmarks/bench_quality.py                      # the README table: 1000 samples, 50 steps, CFG 1.5
    python benchmarks/bench_quality.py --resume             # go on after an interruption

Each method is quantized and sampled in its own process (wall time and peak RSS from /usr/bin/time),
with the same seed as the full-precision reference, then evaluated (digits-classifier FID against the
real digits, class accuracy, paired PSNR vs FP). Writes to --out (default benchmarks/results):
quality.md, quality.json, fid_vs_bits.png and grids.png.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.plots import plot_fid_vs_bits, side_by_side  # noqa: E402
from vq4dit.calib.checkpoints import STATE_DIR  # noqa: E402
from vq4dit.evaluation.report import evaluate_files  # noqa: E402
from vq4dit.jobs.keys_read import flags_read_by  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.utils.resources import EMBEDDED_DIT  # noqa: E402

# (label, quantize.py flags); W = bits per index weight, d = sub-vector length
METHODS = {  # in the order they run: the W2 comparison first
    "rtn-w2": ("RTN W2", ["--method", "rtn", "--wbits", "2"]),
    "kmeans-w2": ("k-means W2 (k256 d4)", ["--method", "kmeans", "--wbits", "2", "--dim", "4"]),
    "vq4dit-w2": ("VQ4DiT W2 n=2", ["--method", "vq4dit", "--wbits", "2", "--dim", "4"]),
    "codebook-w2": ("codebook-only W2", ["--method", "codebook", "--wbits", "2", "--dim", "4"]),
    "rtn-w3": ("RTN W3", ["--method", "rtn", "--wbits", "3"]),
    "kmeans-w3": ("k-means W3 (k64 d2)", ["--method", "kmeans", "--wbits", "3", "--dim", "2"]),
    "vq4dit-w3": ("VQ4DiT W3 n=2", ["--method", "vq4dit", "--wbits", "3", "--dim", "2"]),
    "rtn-w4": ("RTN W4", ["--method", "rtn", "--wbits", "4"]),
    "vq4dit-w2-n1": ("VQ4DiT W2 n=1", ["--method", "vq4dit", "--wbits", "2", "--dim", "4", "--candidates", "1"]),
    "vq4dit-w2-n3": ("VQ4DiT W2 n=3", ["--method", "vq4dit", "--wbits", "2", "--dim", "4", "--candidates", "3"]),
    "codebook-w3": ("codebook-only W3", ["--method", "codebook", "--wbits", "3", "--dim", "2"]),
}
GRID_METHODS = ["rtn-w2", "kmeans-w2", "vq4dit-w2"]


def timed(cmd, log_path, append=False):
    """Run cmd, its output to log_path; returns (wall seconds, peak RSS MiB) measured by /usr/bin/time.

    append: the run goes on from an interrupted one logged in log_path (quantize.py resumes its calibration):
    the wall seconds are summed over every segment in the log (the interrupted ones included), the RSS is the
    largest."""
    with open(log_path, "a" if append else "w") as log:
        subprocess.run(["/usr/bin/time", "-f", "TIME %e %M %U %S", *cmd], cwd=ROOT, stdout=log, stderr=log, check=True)
    runs = time_lines(log_path)
    return sum(seconds for seconds, _ in runs), max(kib for _, kib in runs) / 1024


def time_lines(log_path):
    """[(wall seconds, peak RSS KiB)] of every process /usr/bin/time logged in log_path (more than one when an
    interrupted run was resumed)."""
    with open(log_path) as f:
        return [(float(p[1]), int(p[2])) for p in (line.split() for line in f if line.startswith("TIME "))]


def cpu_seconds(log_path):
    """User + system CPU seconds of every process /usr/bin/time logged in log_path, summed (None when a logged
    process has no CPU fields: logs written before they were recorded)."""
    with open(log_path) as f:
        runs = [line.split() for line in f if line.startswith("TIME ")]
    return sum(float(p[3]) + float(p[4]) for p in runs) if all(len(p) == 5 for p in runs) else None


def bits_per_weight(artifact):
    """Weight-count-averaged bits per weight of the quantized layers, without and with codebooks/scales."""
    layers = json.load(open(os.path.join(artifact, "quant_config.json")))["layers"].values()
    total = sum(v["in_features"] * v["out_features"] for v in layers)
    plain = sum(v["bits_per_weight"] * v["in_features"] * v["out_features"] for v in layers) / total
    full = sum(v["bits_per_weight_with_codebook"] * v["in_features"] * v["out_features"] for v in layers) / total
    return plain, full


def sample_cmd(args, out, source):
    return [sys.executable, "sample.py", *source, "--num-samples", str(args.num_samples), "--steps", str(args.steps),
            "--seed", str(args.seed), "--batch-size", str(args.batch_size), "--out", out]


def samples_path(out, key):
    """Where the samples of method `key` ("fp": the full-precision reference) live under --out."""
    sub = [] if key == "fp" else ["samples"]  # a quantized run's directory is its artifact
    return os.path.join(out, "runs", key, *sub, "samples.npz")


def last_value(flags, flag):
    """The value of `flag` in quantize.py `flags` (the last one given), None when it is not given."""
    return flags[len(flags) - 1 - flags[::-1].index(flag) + 1] if flag in flags else None


def last_method(flags):
    """The --method of quantize.py `flags` (the last one given; vq4dit when none is)."""
    return last_value(flags, "--method") or "vq4dit"


def row_settings(flags):
    """The settings of quantize.py `flags` that decide which other flags the run reads (jobs.keys_read)."""
    settings = {"method": last_method(flags), "recipe": last_value(flags, "--recipe"),
                "calib": last_value(flags, "--calib"), "bits": last_value(flags, "--bits")}
    return {key: float(value) if key == "bits" else value for key, value in settings.items() if value is not None}


def run_method(key, args, reference, label=None, flags=None):
    """Quantize (METHODS[key], or `label` and quantize.py `flags`), sample, evaluate; one row of the table."""
    label, flags = (label, flags) if flags is not None else METHODS[key]
    return {**quantize_method(key, args, label, flags), **sample_method(key, args, reference)}


def quantize_method(key, args, label, flags):
    """Quantize into --out/runs/key with quantize.py `flags`: the row's label, bits, size and quantize cost."""
    art = os.path.join(args.out, "runs", key)
    resumed = os.path.isdir(os.path.join(art, STATE_DIR))  # an interrupted calibration left its state: go on
    extra = flags_read_by(row_settings(flags), args.extra)  # one set of extras serves every row
    q_time, q_rss = timed([sys.executable, "quantize.py", "--seed", str(args.seed), *flags, *extra, "--out", art],
                          art + ".quantize.log", append=resumed)  # a method's own --seed wins
    bpw, bpw_full = bits_per_weight(art)
    size = os.path.getsize(os.path.join(art, "model.safetensors")) / 2**20
    return {"key": key, "method": label, "bits_per_weight": bpw, "bits_per_weight_with_codebook": bpw_full,
            "artifact_mib": size, "quantize_s": q_time, "quantize_cpu_s": cpu_seconds(art + ".quantize.log"),
            "quantize_peak_rss_mib": q_rss, "quantize_segments": len(time_lines(art + ".quantize.log"))}


def sample_method(key, args, reference):
    """Sample the artifact --out/runs/key and evaluate it against the FP samples `reference`."""
    art = os.path.join(args.out, "runs", key)
    samples = samples_path(args.out, key)
    s_time, s_rss = timed(sample_cmd(args, os.path.dirname(samples), ["--quantized", art]), art + ".sample.log")
    return {**evaluate_files(samples, reference_path=reference), "sample_s": s_time, "sample_peak_rss_mib": s_rss}


def write_table(rows, path, args):
    head = ("| method | bits/weight (+codebook) | FID | accuracy | PSNR vs FP (dB) | artifact MiB | quantize s "
            "| quantize peak RSS MiB | sample s | sample peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        psnr = "-" if r["psnr_vs_reference"] is None else f"{r['psnr_vs_reference']:.2f}"
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.2f} ({r['bits_per_weight_with_codebook']:.2f}) | "
                     f"{r['fid']:.2f} | {r['accuracy']:.3f} | {psnr} | {r['artifact_mib']:.2f} | "
                     f"{r['quantize_s']:.1f} | {r['quantize_peak_rss_mib']:.0f} | {r['sample_s']:.1f} | "
                     f"{r['sample_peak_rss_mib']:.0f} |")
    note = (f"Embedded DiT-Digits/2, {args.num_samples} samples, {args.steps} steps, CFG 1.5, seed {args.seed}; "
            f"extra quantize flags: {' '.join(args.extra) or 'none'}. Times are wall seconds of the whole "
            "process on this machine (2 CPU cores), imports included, with OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.\n\n")
    write_text_atomic(path, note + head + "\n".join(lines) + "\n")


def settings(args):
    """What a result row depends on: --resume only keeps rows measured with the same settings."""
    return {"num_samples": args.num_samples, "steps": args.steps, "seed": args.seed, "extra": args.extra}


def load_rows(path, args):
    """Rows of an earlier (interrupted) run with the same settings, or [] when there are none / not resuming."""
    if not args.resume or not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    if saved.get("settings") != settings(args):
        sys.exit(f"{path} was measured with {saved.get('settings')}, not {settings(args)}; "
                 "rerun without --resume (or with the same settings)")
    return saved["rows"]


def main(args):
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    reference = samples_path(args.out, "fp")
    fp_dir = os.path.dirname(reference)
    rows = load_rows(os.path.join(args.out, "quality.json"), args)
    if not rows or not os.path.exists(reference):
        fp_time, fp_rss = timed(sample_cmd(args, fp_dir, []), fp_dir + ".sample.log")
        rows = [{"key": "fp", "method": "full precision", **evaluate_files(reference), "bits_per_weight": 32.0,
                 "bits_per_weight_with_codebook": 32.0, "quantize_s": 0.0, "quantize_peak_rss_mib": 0.0,
                 "artifact_mib": os.path.getsize(EMBEDDED_DIT) / 2**20,
                 "sample_s": fp_time, "sample_peak_rss_mib": fp_rss}]
    for key in args.methods:
        if any(r["key"] == key for r in rows):
            continue
        rows.append(run_method(key, args, reference))
        print(json.dumps(rows[-1]), flush=True)
        # everything is rewritten after every method, so a long run that is stopped keeps what it measured
        write_report(rows, reference, args)


def write_report(rows, reference, args):
    write_table(rows, os.path.join(args.out, "quality.md"), args)
    write_text_atomic(os.path.join(args.out, "quality.json"), json.dumps({"settings": settings(args), "rows": rows},
                                                                          indent=1))
    plot_fid_vs_bits(rows[1:], rows[0]["fid"], os.path.join(args.out, "fid_vs_bits.png"))
    done = [r["key"] for r in rows]
    panels = [("full precision", reference)] + [
        (METHODS[k][0], samples_path(args.out, k)) for k in GRID_METHODS if k in done]
    side_by_side(panels, os.path.join(args.out, "grids.png"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                        help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--resume", action="store_true", help="keep the rows quality.json already holds")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("extra", nargs="*", help="extra quantize.py flags after --, e.g. -- --iters 50")
    main(parser.parse_args())
