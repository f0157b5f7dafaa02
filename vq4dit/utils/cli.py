"""Entry-script helpers: the one way they end (a UserError, or a full disk anywhere, is one line on stderr and exit
status 2, never a traceback; Ctrl-C (SIGINT) and SIGTERM are one line and exit status 130 / 143, after the same
cleanup an error gets; under torchrun only rank 0 prints), and checks of the flags' values."""
import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading

from vq4dit.utils.errors import RankError, UserError
from vq4dit.utils.fileio import disk_full

NUM_TIMESTEPS = 1000  # the DDPM training schedule that sampling respaces
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed and numpy's SeedSequence both take 0..2^63-1
MAX_CFG_SCALE = 100.0  # beyond any guidance used in practice (1..20); larger scales overflow fp16/bf16 outputs
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"


def launch_rank():
    """This process's rank in torchrun's environment (utils.distributed.world), read without importing torch: 0 when
    not launched by torchrun, and still after the process group is shut down."""
    return int(os.environ.get("RANK", 0))


def setup_logging(level=logging.INFO):
    """The scripts' log format at `level`; under torchrun ranks other than 0 log warnings and errors only (every rank
    runs the same stages, and N copies of each progress line hide the one that matters)."""
    logging.basicConfig(level=level if launch_rank() == 0 else max(level, logging.WARNING),
                        format=LOG_FORMAT)


HUB_BARS_OFF = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's switch, read when it is imported


@contextlib.contextmanager
def quiet_libraries(quiet):
    """-q: the Hugging Face libraries' progress bars off inside the block (downloads, and the loading bars of
    transformers and diffusers, which follow huggingface_hub's switch: models/pipelines.py), restored after. Through
    the environment while huggingface_hub is not imported (importing it to flip the switch costs a second); a
    huggingface_hub first imported inside the block reads the switch then and keeps it for the process (a script's
    own process: nothing after it)."""
    if not quiet:
        yield
        return
    hub, saved = sys.modules.get("huggingface_hub.utils"), os.environ.get(HUB_BARS_OFF)
    was_off = hub is not None and hub.are_progress_bars_disabled()
    os.environ[HUB_BARS_OFF] = "1"
    if hub is not None:
        hub.disable_progress_bars()
    try:
        yield
    finally:
        if saved is None:
            del os.environ[HUB_BARS_OFF]
        else:
            os.environ[HUB_BARS_OFF] = saved
        if hub is not None and not was_off:
            hub.enable_progress_bars()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: whatever cleans up after an interrupt
    (temporary files, a calibration's resume message) runs for it too."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated inside the block (signal handlers can only be set from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print(message, error):
    """Print on rank 0 (under torchrun every rank meets the same input); a RankError by the rank that met it. The
    progress bars the failure left open are closed first, so that the message starts its own line and is the last
    (a bar collected at exit would print itself again after it)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    if isinstance(error, RankError) and launch_rank() != 0:
        print(f"error: rank {launch_rank()}: {message}", file=sys.stderr)
    elif launch_rank() == 0:
        print(message if isinstance(error, KeyboardInterrupt) else f"error: {message}", file=sys.stderr)


def run_cli(main, args, on_interrupt=None, quiet=False):
    """Call main(args); a UserError (or a full disk that no writer reported: utils.fileio.disk_full) ends the process
    with one `error:` line and exit status 2 (under torchrun every rank meets the same bad input, so rank 0 alone
    prints it; a RankError is printed by the rank that met it); Ctrl-C (SIGINT) or SIGTERM ends it with one
    `interrupted` / `terminated (SIGTERM)` line, followed by `on_interrupt()` when given (where a rerun picks up, what
    was written), and exit status 130 or 143 (128 + the signal's number, as a shell reports a process it killed).
    quiet (-q): the Hugging Face libraries' progress bars off too (quiet_libraries)."""
    try:
        with _sigterm_raises(), quiet_libraries(quiet):
            main(args)
    except UserError as e:
        _print(e, e)
        sys.exit(2)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        hint = on_interrupt() if on_interrupt is not None else None
        _print(f"{what}{'; ' + hint if hint else ''}", e)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except Exception as e:
        error = disk_full(e)
        if error is None:
            raise
        _print(error, error)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (exit status 2) are printed by torchrun's rank 0 only, with --version."""

    def __init__(self, *args, **kwargs):
        from vq4dit import __version__

        super().__init__(*args, **kwargs)
        self.description = as_invoked(self.description, self.prog)
        self.add_argument("--version", action="version", version=f"vq4dit {__version__}")

    def error(self, message):
        if launch_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def as_invoked(text, prog):
    """Help `text` whose examples read `python X.py` (a clone's script) with them written as program `prog` was
    started instead, where it is a console script (vq4dit-X) or `python -m vq4dit X`: commands that run as shown."""
    if text is None or prog.endswith(".py"):
        return text
    return text.replace(f"python {prog.removeprefix('vq4dit-').split()[-1]}.py", prog)


def local_path(text):
    """argparse type of a path flag: `~` expanded, as the shell does not in --out=~/x or inside a preset."""
    return os.path.expanduser(text)


def check_range(flag, value, low=None, high=None):
    """`value` when it is a finite number in [low, high] (None: unbounded on that side), else a UserError naming
    `flag`, the value and the valid range. Integer flags give integer bounds."""
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and (low is None or value >= low) and (high is None or value <= high):
        return value
    kind = "an integer" if isinstance(value, int) else "a finite number"
    if high is None:
        valid = f"{kind} >= {low}"
    elif isinstance(value, int):
        valid = f"{kind} in {low}..{high}"
    else:
        valid = f"{kind} in [{low}, {high}]"
    raise UserError(f"{flag} {value}: must be {valid}")


def check_not_blank(values):
    """UserError for the first of `values` {flag: value given or None} that is empty or blank: an empty path, name or
    pattern would otherwise fall back to a default or match everything, silently."""
    for flag, value in values.items():
        if value is not None and not value.strip():
            raise UserError(f"{flag} {value!r}: empty; give a value or leave the flag out")


def split_classes(text):
    """'1,3,5' -> [1, 3, 5]: the syntax of --classes (checked before the model is loaded); an empty item ('1,,2',
    '1,', '') is an error."""
    items = [c.strip() for c in text.split(",")]
    form = "expected a comma-separated list of class ids like 0,1,2"
    if "" in items:
        raise UserError(f"--classes {text!r}: empty item; {form}")
    try:
        return [int(c) for c in items]
    except ValueError:
        raise UserError(f"--classes {text!r}: {form}") from None


def parse_classes(text, num_classes):
    """'1,3,5' -> [1, 3, 5], each in 0..num_classes-1; None -> None (uniform random labels). num_classes None:
    the model takes no class ids (a text-to-image model)."""
    if text is None:
        return None
    classes = split_classes(text)
    if num_classes is None:
        raise UserError(f"--classes {text!r}: this model is not class-conditional; give --prompt or --prompts")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--classes {text!r}: {', '.join(map(str, bad))} out of range; class ids are integers in "
                        f"0..{num_classes - 1}")
    return classes


def check_sampling_args(num_samples, steps, batch_size, seed=0, cfg_scale=1.0):
    """UserError naming the first of the sampling flags that is out of range (the count's memory is checked once
    the image size is known: jobs.sample.check_memory)."""
    check_range("--num-samples", num_samples, 1)
    check_range("--batch-size", batch_size, 1)
    check_range("--steps", steps, 1, NUM_TIMESTEPS)
    check_range("--seed", seed, 0, MAX_SEED)
    check_range("--cfg-scale", cfg_scale, 0.0, MAX_CFG_SCALE)
