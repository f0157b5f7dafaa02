"""A quick quality proxy for artifacts of the embedded digits model, for trying calibration levers before the
full FID rows (bench_recipes.py): the held-out noise-prediction error vs FP (bench_recipes' held-out inputs: 16
trajectories x 10 steps, CFG 1.5, seed 1000) and the PSNR vs FP of a few samples drawn with the same seeds.

    python benchmarks/quick_proxy.py outputs/a outputs/b --samples 100 --out outputs/proxy
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_recipes import held_out_calls  # noqa: E402
from vq4dit.calib.metrics import prediction_mse  # noqa: E402
from vq4dit.evaluation.report import evaluate_files  # noqa: E402
from vq4dit.vq import load_quantized  # noqa: E402


def samples(out, n, seed, extra):
    """samples.npz of `n` samples (sampling seed `seed`) under `out`, drawn once by sample.py with flags `extra`."""
    path = os.path.join(out, "samples.npz")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--num-samples", str(n), "--seed",
                        str(seed), "--out", out, "-q", *extra], check=True)
    return path


def main(args):
    teacher, adapter, calls = held_out_calls()
    reference = samples(os.path.join(args.out, "fp"), args.samples, args.seed, [])
    for art in args.artifacts:
        model, _, _ = load_quantized(art)
        noise = prediction_mse(model, teacher, adapter, calls, "cpu")
        mine = samples(os.path.join(args.out, os.path.basename(os.path.normpath(art))), args.samples, args.seed,
                       ["--quantized", art])
        psnr = evaluate_files(mine, reference_path=reference)["psnr_vs_reference"]
        print(f"{art}: noise MSE {noise:.6f}, PSNR vs FP {psnr:.2f} dB ({args.samples} samples)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "proxy"))
    main(parser.parse_args())
