"""Entry-script helpers: the one way they end (a UserError is one line on stderr and exit status 2, never a
traceback), and checks of the sampling flags."""
import sys

from utils.errors import UserError

NUM_TIMESTEPS = 1000  # the DDPM training schedule that sampling respaces


def run_cli(main, args, on_interrupt=None):
    """Call main(args); on Ctrl-C print `on_interrupt()` (when given) and exit 130."""
    try:
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        print(f"interrupted; {on_interrupt()}", file=sys.stderr)
        sys.exit(130)


def parse_classes(text, num_classes):
    """'1,3,5' -> [1, 3, 5], each in 0..num_classes-1; None/'' -> None (uniform random labels). num_classes None:
    the model takes no class ids (a text-to-image model)."""
    if not text:
        return None
    if num_classes is None:
        raise UserError(f"--classes {text!r}: this model is not class-conditional; give --prompt or --prompts")
    valid = f"class ids are integers in 0..{num_classes - 1}"
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--classes {text!r}: expected a comma-separated list like 0,1,2; {valid}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--classes {text!r}: {', '.join(map(str, bad))} out of range; {valid}")
    if not classes:
        raise UserError(f"--classes {text!r}: no class ids given; {valid}")
    return classes


def check_sampling_args(num_samples, steps, batch_size):
    """UserError naming the first of the sampling counts that is out of range."""
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if not 1 <= steps <= NUM_TIMESTEPS:
        raise UserError(f"--steps {steps}: must be in 1..{NUM_TIMESTEPS} (respaced DDPM steps)")
