"""Evaluate a batch of samples (.npz in the ADM format: arr_0 uint8 (N, H, W, 3), arr_1 labels).

digits (default for 16x16 images): FID in the digits classifier's feature space against all 1797
real digits, and the classifier's accuracy on the conditional samples (argmax == arr_1).
imagenet: FID against an ADM reference batch (--ref-batch), via the optional torch-fidelity package.
With --reference (full-precision samples from the same seeds and labels): paired PSNR (dB, from the
pooled MSE, data range 255) and MSE (pooled, on the [0, 1] pixel scale). Videos (arr_0 (N, F, H, W, 3), as
sample.py writes them for a video pipeline): the paired PSNR/MSE over every frame, with --reference only.

    python evaluate.py --samples /tmp/q/samples.npz --reference /tmp/fp/samples.npz --json /tmp/q/eval.json

JSON keys: fid, accuracy, psnr_vs_reference, mse_vs_reference, num_samples (null where not computed), notes
(why a value is null: an infinite PSNR, samples identical to the reference).
FID is biased upward at small N: compare runs only at equal num_samples.
"""
import argparse

from vq4dit.evaluation.report import KINDS, check_result_path, evaluate_files, format_table, write_result_json
from vq4dit.evaluation.samples import samples_file
from vq4dit.utils.cli import ArgumentParser, check_not_blank, local_path, run_cli, setup_logging
from vq4dit.utils.resources import DIGITS_CLASSIFIER


def main(args):
    check_not_blank({"--samples": args.samples, "--reference": args.reference, "--json": args.json,
                     "--ref-batch": args.ref_batch, "--classifier": args.classifier})
    if args.json is not None:
        check_result_path(args.json)  # before the metrics, which can take minutes
    args.samples = samples_file(args.samples, "--samples")
    args.reference = args.reference and samples_file(args.reference, "--reference")
    result = evaluate_files(args.samples, reference_path=args.reference, kind=args.kind,
                            ref_batch_path=args.ref_batch, classifier_path=args.classifier)
    if args.json is not None:
        write_result_json(args.json, result)
    print(format_table(result))


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, type=local_path,
                        help="samples .npz (arr_0 uint8 (N, H, W, 3) or videos (N, F, H, W, 3), arr_1 labels), or "
                             "sample.py's --out directory")
    parser.add_argument("--reference", default=None, type=local_path,
                        help="FP samples .npz from the same seeds (or their directory), for PSNR/MSE")
    parser.add_argument("--json", default=None, type=local_path, help="write the metrics here as JSON")
    parser.add_argument("--kind", choices=KINDS, default=None, help="benchmark (default: digits iff 16x16)")
    parser.add_argument("--ref-batch", default=None, type=local_path, help="ADM reference batch .npz (imagenet FID)")
    parser.add_argument("--classifier", default=DIGITS_CLASSIFIER, type=local_path,
                        help="digits classifier safetensors")
    return parser


def cli(argv=None):
    """Run evaluate.py with `argv` (default: sys.argv[1:]); ends with SystemExit (2 on bad input, 130 / 143 on
    SIGINT / SIGTERM) or returns."""
    setup_logging()
    args = build_parser().parse_args(argv)
    run_cli(main, args, on_interrupt=lambda: f"no result written{f' to {args.json}' if args.json else ''}")


if __name__ == "__main__":
    cli()
