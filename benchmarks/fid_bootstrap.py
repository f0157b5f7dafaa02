"""How much of an FID gap on the digits benchmark is the luck of the draw: a paired bootstrap over the samples.

    python benchmarks/fid_bootstrap.py        # after bench_quality.py: reads benchmarks/results/runs/*/samples.npz

Every method samples the same seeds and labels, so sample i of every method starts from the same noise. One
resampled index set (N draws with replacement) is applied to all methods at once (paired), and the spread of
FID(method) - FID(reference method) over the resamples says whether two methods differ beyond the sampling
noise of N = 1000 draws. Resampling duplicates samples, which shifts every bootstrap FID upward by a similar
amount; the differences are what to read. Writes fid_bootstrap.md next to quality.md.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_quality import samples_path  # noqa: E402
from vq4dit.evaluation.digits import classifier_outputs, load_digits_classifier, real_digits_uint8  # noqa: E402
from vq4dit.evaluation.metrics import fid_from_features  # noqa: E402
from vq4dit.evaluation.samples import load_samples  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402


def paired_bootstrap(features, real, resamples, seed):
    """features {key: (N, D)} -> {key: (resamples,) FIDs vs real (M, D)}, one index set per resample for all."""
    n = next(iter(features.values())).shape[0]
    rng = np.random.default_rng(seed)
    out = {key: np.empty(resamples) for key in features}
    for b in range(resamples):
        idx = rng.integers(0, n, n)  # (N,)
        for key, f in features.items():
            out[key][b] = fid_from_features(f[idx], real)
    return out


def main(args):
    with open(os.path.join(args.results, "quality.json")) as f:
        rows = json.load(f)["rows"]
    if args.reference not in [r["key"] for r in rows]:
        sys.exit(f"--reference {args.reference}: not in quality.json; valid: {', '.join(r['key'] for r in rows)}")
    classifier = load_digits_classifier()
    real, _ = classifier_outputs(classifier, real_digits_uint8()[0])
    features = {}
    for r in rows:
        features[r["key"]], _ = classifier_outputs(classifier, load_samples(samples_path(args.results, r["key"]))[0])
    boot = paired_bootstrap(features, real, args.resamples, args.seed)
    ref = boot[args.reference]
    ref_label = next(r["method"] for r in rows if r["key"] == args.reference)
    lines = [
        "# FID sampling noise: paired bootstrap", "",
        f"Command: `python benchmarks/fid_bootstrap.py --resamples {args.resamples} --seed {args.seed} "
        f"--reference {args.reference}`; samples and FIDs of `quality.md` ({len(real)} real digits as the "
        f"reference set). Differences are FID(method) - FID({ref_label}) on the same resampled indices; "
        "an interval that excludes 0 is a difference beyond the sampling noise.", "",
        f"| method | FID | bootstrap std | FID - FID({ref_label}): mean | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = boot[r["key"]] - ref
        lo, hi = np.percentile(diff, [2.5, 97.5])
        interval = "-" if r["key"] == args.reference else f"[{lo:+.1f}, {hi:+.1f}]"
        lines.append(f"| {r['method']} | {r['fid']:.1f} | {boot[r['key']].std(ddof=1):.1f} | "
                     f"{diff.mean():+.1f} | {interval} |")
    out = os.path.join(args.results, "fid_bootstrap.md")
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--reference", default="vq4dit-w2", help="the method every difference is taken against")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    main(parser.parse_args())
