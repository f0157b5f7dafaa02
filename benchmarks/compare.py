"""Compare sample sets drawn with the same seeds: a metrics table and the grids side by side.

    python benchmarks/compare.py --reference outputs/run/fp/samples.npz \
        --run "k-means W2=outputs/run/kmeans_w2/samples/samples.npz" --run "VQ4DiT W2=..." --out outputs/run
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plots import side_by_side  # noqa: E402
from vq4dit.evaluation.report import evaluate_files  # noqa: E402
from vq4dit.utils.cli import run_cli  # noqa: E402
from vq4dit.utils.errors import UserError  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402


def fmt(value, spec):
    """value formatted with spec, or "-" right-aligned to spec's width when there is none."""
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def compare(reference, runs, out_dir):
    """runs: [(name, npz path)]; returns rows of metrics (FP first) and writes compare.json and compare.png."""
    rows = [{"name": "full precision", **evaluate_files(reference)}]
    rows += [{"name": name, **evaluate_files(path, reference_path=reference)} for name, path in runs]
    write_text_atomic(os.path.join(out_dir, "compare.json"), json.dumps(rows, indent=1))
    side_by_side([("full precision", reference), *runs], os.path.join(out_dir, "compare.png"))
    return rows


def main(args):
    runs = []
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep:
            raise UserError(f"--run {item!r}: expected NAME=PATH.npz")
        runs.append((name, path))
    rows = compare(args.reference, runs, args.out)
    print(f"{'samples':<18}{'FID':>9}{'accuracy':>10}{'PSNR vs FP':>12}")
    for r in rows:
        print(f"{r['name']:<18}{fmt(r['fid'], '9.2f')}{fmt(r['accuracy'], '10.3f')}"
              f"{fmt(r['psnr_vs_reference'], '12.2f')}")
    print(f"side by side: {os.path.join(args.out, 'compare.png')}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="samples.npz of the full-precision model")
    parser.add_argument("--run", action="append", default=[], help="NAME=samples.npz, same seeds as the reference")
    parser.add_argument("--out", required=True)
    run_cli(main, parser.parse_args())
