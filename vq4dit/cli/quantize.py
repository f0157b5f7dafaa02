"""Quantize a DiT with VQ4DiT (or a baseline) and save a compact artifact.

    python quantize.py                                   # embedded digits model, W2 (k256 d4), VQ4DiT
    python quantize.py --config dit_xl_256_w2 --ckpt DiT-XL-2-256x256.pt --out out/xl_w2

Values come from the dataclass defaults, then the YAML preset (--config), then the flags given here.
"""
import argparse
import logging
import os
from pathlib import Path

from vq4dit.jobs.config import CONFIG_KINDS, FLAGS, load_config
from vq4dit.jobs.plan_stages import PLAN_JSON
from vq4dit.utils.cli import ArgumentParser, check_not_blank, launch_rank, local_path, run_cli, setup_logging
from vq4dit.utils.errors import UserError
from vq4dit.utils.fileio import check_result_file
from vq4dit.utils.knobs import add_flags, text_flags


def config_overrides(args):
    """{config key: flag value}; None for a flag not given, which load_config then ignores."""
    return {name: getattr(args, name) for name in FLAGS}


def default_out(config):
    """outputs/<model>_<method>_<size>: the model a DiT's registry name, a pipeline's its directory or hub repo name
    (the DiT name, which a pipeline does not use, sent Flux runs to outputs/digits_2_...)."""
    if config.model.uses_pipeline():  # its directory as given (not a symlink's target), or a hub cache's repo name
        path = Path(os.path.abspath(os.path.expanduser(str(config.model.ckpt))))
        cached = path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--")
        name = (path.parent.parent.name.split("--")[-1] if cached else path.name).lower()
    else:
        name = config.model.model.replace("/", "_").replace("DiT-", "").lower()
    c = config.codebooks
    if c.bits is not None:
        size = f"b{c.bits:g}"
    else:  # a codebook size that overrides wbits names the run by k (a k16 d4 run is not w2d4's artifact)
        size = f"k{c.k}d{c.dim}" if c.overrides_wbits else f"w{c.wbits}d{c.dim}"
    return f"outputs/{name}_{config.method}_{size}"


def check_bits_alone(args):
    """--bits allocates k and d per layer: --wbits, --dim and --codebook-size beside it would be ignored."""
    given = [flag for flag, value in (("--wbits", args.wbits), ("--dim", args.dim),
                                      ("--codebook-size", args.codebook_size)) if value is not None]
    if args.bits is not None and given:
        raise UserError(f"--bits {args.bits:g} chooses k and d per layer; it cannot be given with {', '.join(given)}")


def main(args):
    check_not_blank({"--config": args.config, **text_flags(args, CONFIG_KINDS, FLAGS), "--out": args.out,
                     "--json": args.json})
    if args.json is not None and not args.dry_run:
        raise UserError(f"--json {args.json}: the plan's JSON comes with --dry-run only")
    if args.json is not None:
        check_result_file("--json", args.json, PLAN_JSON, "plan.json")
    if args.skip_existing and args.dry_run:
        raise UserError("--skip-existing: --dry-run writes nothing to keep; drop one of them")
    check_bits_alone(args)
    overrides = config_overrides(args)
    config = load_config(args.config, overrides)
    config.model.check_pipeline_flags(overrides)
    from vq4dit.jobs.plan_sources import warn_preset_family

    warn_preset_family(args.config, config.model.ckpt)
    if args.dry_run:
        from vq4dit.jobs.preflight import check_inputs

        check_inputs(config)  # the run's first checks: no plan for a run that stops in its first second
        if config.model.prompts:  # the run reads them first: a plan for prompts it cannot read is no plan
            from vq4dit.models.prompts import read_prompts

            read_prompts(config.model.prompts)
        print(config.to_yaml(), end="")
        if config.codebooks.bits is not None:
            from vq4dit.jobs.allocation import budget_text

            print(budget_text(config))
        from vq4dit.jobs.memory_plan import dry_run_plan  # torch is imported only to plan a model

        plan = dry_run_plan(config, args.json)
        if plan is None:
            none = ("no memory plan for this run (the embedded DiT, a DiT checkpoint file and text-to-image or video "
                    "pipelines are planned, with a method that builds codebooks)")
            if args.json is not None:
                raise UserError(f"--json {args.json}: {none}; nothing written")
            print(none)
        else:
            print(plan)
        return
    # imported here so that --dry-run and config errors answer without loading torch
    from vq4dit.jobs.quantize import made_by_this_run, quantize

    args.out = args.out or default_out(config)
    if args.skip_existing and made_by_this_run(args.out, config):
        if launch_rank() == 0:
            print(f"kept {args.out}: it holds the artifact of this run (the same config and input files)")
        return
    quantize(config, args.out, progress=not args.quiet, overwrite=args.overwrite)
    if launch_rank() == 0:  # under torchrun rank 0 writes the artifact (and says so once)
        print(f"wrote {args.out}")


def resume_hint(out):
    """After Ctrl-C: where a rerun of the same command picks up (calibration state is saved per block)."""
    from vq4dit.calib.checkpoints import STATE_DIR, resume_point

    point = resume_point(out) if out else None
    if point is None:
        return "no calibration state saved yet; rerun the same command to start over"
    return f"rerun the same command to resume from {point} (state in {os.path.join(out, STATE_DIR)})"


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a shipped preset by name (digits_w2, dit_xl_256_w2, "
                        "flux_dev_w2, ...: vq4dit/configs/) or a YAML file")
    add_flags(parser, CONFIG_KINDS, FLAGS)  # help and type as declared on the config fields
    parser.add_argument("--out", type=local_path,
                        help="artifact directory (default outputs/<model>_<method>_w<bits>d<dim>, or k<k>d<dim> with "
                             "--codebook-size)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out that holds files vq4dit did "
                        "not write (they are kept: a file of an artifact's name that vq4dit did not write is never "
                        "replaced), and delete a calibration state there that this run would not resume (another "
                        "config, checkpoint or method); without it either is an error")
    parser.add_argument("--skip-existing", action="store_true", help="keep an artifact in --out that this same run "
                        "made (every setting that changes the result, and the checkpoint and prompts file by content, "
                        "as its quant_config.json records them) and exit 0 without quantizing: a rerun of run.sh")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config (and, for a text-to-image "
                        "pipeline or a DiT, its memory plan) and exit")
    parser.add_argument("--json", metavar="FILE", type=local_path,
                        help="with --dry-run: also write the plan's peaks (each stage's device and host bytes, the "
                             "overall peaks) to FILE as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs (as sample.py -q)")
    return parser


def cli(argv=None):
    """Run quantize.py with `argv` (default: sys.argv[1:]); ends with SystemExit (2 on bad input, 130 on Ctrl-C) or
    returns."""
    args = build_parser().parse_args(argv)
    if args.verbose and args.quiet:
        build_parser().error("-v and -q: give one of them")
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    run_cli(main, args, on_interrupt=lambda: resume_hint(args.out), quiet=args.quiet)


if __name__ == "__main__":
    cli()
