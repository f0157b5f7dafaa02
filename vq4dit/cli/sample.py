"""Sample a diffusion transformer (full precision or quantized) to DIR/grid.png and DIR/samples.npz (ADM format).

Default: the embedded DiT-Digits/2 model. A project DiT samples with DiT's own sampler: same seed -> same images,
whatever the batch size or number of processes. A diffusers artifact samples through its pipeline (the recorded
source, or --pipeline DIR). Multi-GPU/CPU: torchrun --nproc_per_node N sample.py ... (one npz, written by rank 0).
"""
import argparse
import contextlib
import logging
import math
import os

from vq4dit.utils.cli import (
    ArgumentParser,
    check_range,
    check_sampling_args,
    local_path,
    parse_classes,
    run_cli,
    setup_logging,
    split_classes,
)
from vq4dit.utils.errors import UserError

# flags that choose or shape the full-precision model: a quantized artifact records its own
MODEL_FLAGS = (("--model", "model", None), ("--ckpt", "ckpt", None), ("--backend", "backend", "auto"),
               ("--image-size", "image_size", None), ("--num-classes", "num_classes", None))

TEXT_FLAGS = ("--model", "--ckpt", "--quantized", "--pipeline", "--prompts", "--classes", "--vae", "--device", "--out")


def check_artifact(directory):
    """--check: load the artifact as sampling would (every tensor's size and dtype against quant_config.json)."""
    from vq4dit.vq import load_quantized
    from vq4dit.vq.artifact import resolve_artifact

    if not directory:
        raise UserError("--check validates a quantized artifact: give --quantized DIR")
    _, _, quant = load_quantized(resolve_artifact(directory), "cpu")
    print(f"ok: {directory} ({len(quant['tensors'])} tensors, {quant['model_bytes'] / 1e6:.2f} MB)")


def read_prompts(args):
    """--prompt TEXT (repeatable) or --prompts FILE (one per line) -> a list, or None."""
    if args.prompts:
        from vq4dit.models.prompts import read_prompts as read_file

        return read_file(args.prompts)
    return list(args.prompt) if args.prompt else None


def parse_loras(values):
    """--lora FILE_OR_REPO[:SCALE] (repeatable) -> [jobs.loras.LoraSpec]: SCALE (default 1) is the text after the last
    ':' when it is a number; the source must exist here or be a hub repo id owner/name."""
    from vq4dit.jobs.loras import LoraSpec
    from vq4dit.utils.hubid import hub_id_like

    loras = []
    for value in values or ():
        source, colon, tail = value.rpartition(":")
        try:
            scale = float(tail) if colon else None
        except ValueError:
            scale = None
        if scale is None:
            source, scale = value, 1.0
        if not math.isfinite(scale):
            raise UserError(f"--lora {value}: scale {tail} is not a finite number; give FILE_OR_REPO[:SCALE], e.g. "
                            f"{source}:0.8")
        if not (os.path.exists(source) or hub_id_like(source)):
            head = value.rpartition(":")[0]
            if colon and (os.path.exists(head) or hub_id_like(head)):  # the source is there; its scale is not
                raise UserError(f"--lora {value}: scale {tail!r} is not a number; give FILE_OR_REPO[:SCALE], e.g. "
                                f"{head}:0.8")
            raise UserError(f"--lora {value}: {source} is not a file or directory here, nor a hub repo id "
                            "(owner/name); give FILE_OR_REPO[:SCALE]")
        loras.append(LoraSpec(source, scale))
    return loras


def check_flags(args):
    """Every number in range and no flag that does nothing in the mode given, before any work."""
    check_sampling_args(args.num_samples, args.steps, args.batch_size, args.seed, args.cfg_scale)
    for flag, value in (("--image-size", args.image_size), ("--num-classes", args.num_classes),
                        ("--num-frames", args.num_frames), ("--height", args.height), ("--width", args.width)):
        if value is not None:
            check_range(flag, value, 1)
    for flag in TEXT_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not value.strip():
            raise UserError(f"{flag} {value!r}: empty; give a value or leave the flag out")
    if args.quantized is not None:
        artifact = os.path.abspath(os.path.expanduser(args.quantized))
        if not os.path.exists(artifact) and os.path.abspath(args.out).startswith(artifact + os.sep):
            raise UserError(f"--quantized {args.quantized}: no such directory (claiming --out {args.out} inside it "
                            "would create it empty); give an artifact directory written by quantize.py")
        given = [flag for flag, name, default in MODEL_FLAGS if getattr(args, name) != default]
        if given:
            raise UserError(f"{', '.join(given)}: not used with --quantized {args.quantized} (the artifact records "
                            "its model); drop them, or drop --quantized to sample a full-precision model")
    else:
        for flag, value in (("--decode-weights", args.decode_weights), ("--pipeline", args.pipeline)):
            if value:
                raise UserError(f"{flag}: only used with --quantized DIR (a quantized artifact); drop it")
    if args.check:
        defaults = build_parser().parse_args([])
        unused = [name for name, value in vars(args).items()
                  if name not in ("check", "quantized", "quiet") and value != getattr(defaults, name)]
        if unused:
            shown = [f"--{name.replace('_', '-')}" + (f" {getattr(args, name)[0]}" if name == "lora" else "")
                     for name in unused]
            raise UserError(f"{', '.join(shown)}: not used with --check (which only validates the artifact); drop "
                            f"{'it' if len(shown) == 1 else 'them'}")
    if args.classes is not None:
        split_classes(args.classes)
    if args.prompt and args.prompts:
        raise UserError(f"--prompt and --prompts {args.prompts}: give one of them")
    if args.prompt and not all(p.strip() for p in args.prompt):
        raise UserError(f"--prompt {next(p for p in args.prompt if not p.strip())!r}: empty; give the text to draw")


def main(args):
    from vq4dit.utils import distributed
    from vq4dit.utils.device import resolve_device

    check_flags(args)  # before the (slow) model load
    loras = parse_loras(args.lora)
    if args.check:
        return check_artifact(args.quantized)
    # under torchrun: pin this rank's GPU first, so that no rank loads its copy of the model onto cuda:0
    device = distributed.init(resolve_device(args.device))
    with contextlib.ExitStack() as stack:
        if distributed.world()[0] == 0:  # rank 0 writes the samples: it claims --out, before the model loads
            from vq4dit.jobs.sample import claim_sample_dir

            stack.enter_context(claim_sample_dir(args.out, args.overwrite))
        sample(args, loras, device)


def sample(args, loras, device):
    """Load the model, apply the LoRAs and write the samples to --out (claimed by the caller)."""
    from vq4dit.jobs.loras import load_loras
    from vq4dit.jobs.sample import (
        FPSource,
        Request,
        Resume,
        check_vae_flag,
        load_for_sampling,
        sample_to_dir,
    )
    from vq4dit.jobs.sample_state import source_key
    from vq4dit.models.adapters.base import SampleSettings
    from vq4dit.utils.precision import resolve_precision
    from vq4dit.vq.artifact import resolve_artifact

    prompts = read_prompts(args)
    resolve_precision(args.precision, device)  # an unsupported --precision fails now, not after the load
    source = FPSource(args.model, args.ckpt, args.image_size, args.num_classes, args.backend)
    quantized = resolve_artifact(args.quantized) if args.quantized else None  # a hub repo: its snapshot, once
    loaded = load_for_sampling(quantized, source, device, args.decode_weights, args.precision)
    model, adapter, extra = loaded
    if args.pipeline and "pipeline" not in extra:
        raise UserError(f"--pipeline {args.pipeline}: {args.quantized} is not a diffusers artifact; drop --pipeline")
    check_vae_flag(args.vae, adapter, model)
    load_loras(model, extra, loras, args.pipeline, device)
    classes = parse_classes(args.classes, adapter.num_classes(model))
    settings = SampleSettings(seed=args.seed, steps=args.steps, cfg_scale=args.cfg_scale, batch_size=args.batch_size,
                              vae=args.vae or SampleSettings.vae, pipeline=args.pipeline, progress=not args.quiet,
                              num_frames=args.num_frames, height=args.height, width=args.width)
    resume = Resume(source_key(quantized, source, loras, args.precision, args.decode_weights), args.overwrite,
                    args.skip_existing)
    sample_to_dir(loaded, args.out, Request(args.num_samples, classes, prompts), settings, device, resume)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="registry name, e.g. DiT-XL/2 (default: read from the weights)")
    parser.add_argument("--ckpt", default=None, help=".pt/.safetensors file, diffusers pipeline directory or hub id "
                                                     "(default: embedded digits model)")
    parser.add_argument("--backend", default="auto", choices=("auto", "vq4dit", "diffusers"),
                        help="auto: a diffusers pipeline directory or hub id samples through its pipeline; "
                             "vq4dit: map DiT weights into the project's DiT")
    parser.add_argument("--image-size", type=int, default=None, help="pixels, e.g. 256 or 512 (default: from weights)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: from the weights")
    parser.add_argument("--vae", default=None, help="ema | mse | local AutoencoderKL directory (the project's latent "
                                                    "DiTs only; default: ema)")
    parser.add_argument("--quantized", default=None, metavar="DIR",
                        help="quantized artifact: a directory or a hub repo id (owner/name, via the hub cache)")
    parser.add_argument("--pipeline", default=None, metavar="DIR",
                        help="with a diffusers artifact: the pipeline to sample through (default: where it came from)")
    parser.add_argument("--decode-weights", action="store_true",
                        help="with --quantized: decode the weights once at load (FP speed and memory, same images); "
                             "default: decode in every forward, keeping the weights compressed in memory")
    parser.add_argument("--check", action="store_true",
                        help="with --quantized: validate the artifact's tensors against quant_config.json and exit")
    parser.add_argument("--lora", action="append", default=None, metavar="FILE_OR_REPO[:SCALE]",
                        help="diffusers pipelines with a LoRA loader (Flux, SD3), quantized or not: a LoRA file, a "
                             "directory with pytorch_lora_weights.safetensors or a hub repo id, at adapter weight "
                             "SCALE (default 1); repeat for several")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="video pipelines: frames per sample (default: as calibrated, else the pipeline's)")
    parser.add_argument("--height", type=int, default=None,
                        help="text-to-image and video pipelines: pixels (default: as calibrated, else the "
                             "pipeline's); e.g. a full-precision reference at the quantized artifact's size")
    parser.add_argument("--width", type=int, default=None, help="as --height")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default: %(default)s)")
    parser.add_argument("--cfg-scale", type=float, default=1.5,
                        help="classifier-free guidance scale (1 = off; default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=20, help="images to draw (default: %(default)s)")
    parser.add_argument("--classes", default=None, help="comma list cycled over samples (default: uniform random)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text-to-image models: a prompt (repeat for several, cycled over samples)")
    parser.add_argument("--prompts", default=None, type=local_path, metavar="FILE",
                        help="text-to-image models: prompts, one per line")
    parser.add_argument("--seed", type=int, default=0,
                        help="the samples' noise and classes (default: %(default)s); the same seed gives the same "
                             "images")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per forward (default: %(default)s); the images do not depend on it")
    parser.add_argument("--device", default="auto", help="auto (cuda if present; the default) | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16", "fp16"), default=None,
                        help="dtype of the network: fp32 | tf32 (fp32 with TF32 CUDA matmuls; fp32 on CPU) | bf16 | "
                             "fp16 (default: tf32 on CUDA, fp32 on CPU); the sampler's arithmetic stays fp32")
    parser.add_argument("--out", default="outputs/samples", type=local_path, metavar="DIR",
                        help="sample directory: samples.npz, grid.png (videos/ for video pipelines); locked while the "
                             "run writes it; the batches drawn are kept in DIR/sample_state until the end, so that "
                             "the same command rerun after an interrupt resumes (default: %(default)s)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep the samples in --out that this same run drew (the same model files, settings and "
                             "conditions, as samples.npz records them) and draw nothing: a rerun of run.sh")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --out that holds files sample.py did not write (they are kept); without "
                             "it that is an error")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    return parser


def interrupted(out):
    """What an interrupt leaves for a rerun (the import waits until then: --help and bad flags need no torch)."""
    from vq4dit.jobs.sample_state import resume_hint

    return resume_hint(out)


def cli(argv=None):
    """Run sample.py with `argv` (default: sys.argv[1:]); ends with SystemExit (2 on bad input, 130 / 143 on SIGINT /
    SIGTERM) or returns."""
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    run_cli(main, args, on_interrupt=lambda: interrupted(args.out), quiet=args.quiet)


if __name__ == "__main__":
    cli()
