"""The hazards of tests/test_cli_fuzz.py (issue 29) and the judge of every case: a share of the cases runs with
its --out locked by another run, or with the Nth file opened for writing meeting a full disk (ENOSPC), a Ctrl-C
(KeyboardInterrupt) or a SIGTERM; judge says what is wrong with a case's outcome, hazard or not.
"""
import builtins
import contextlib
import errno
import os
import signal
from unittest import mock

from tests.cli_fuzz_specs import last

HAZARD_SHARE = 0.2  # of the cases
WRITE_HAZARDS = ("ENOSPC", "SIGINT", "SIGTERM")
# what a run that met the hazard must end in: (outcome, text of its one line)
MET = {"ENOSPC": ("error", "no space left on the device"), "SIGINT": ("interrupted", "interrupted"),
       "SIGTERM": ("terminated", "terminated (SIGTERM)"), "locked": ("error", "")}


@contextlib.contextmanager
def write_hazard(kind, nth):
    """The `nth` file this process opens for writing (builtins.open in a writing mode, os.open with O_CREAT: every
    writer of the package, and the temporaries before safetensors' own writes) meets `kind`: a full disk, Ctrl-C,
    or SIGTERM (delivered for real: run_cli's handler turns it into an exception). Yields {"met": bool}."""
    from vq4dit.utils import cli

    real_open, real_os_open, state = builtins.open, os.open, {"count": 0, "met": False}

    def hit(path):
        state["count"] += 1
        if state["count"] != nth:
            return
        state["met"] = True
        if kind == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        if kind == "SIGINT":
            raise KeyboardInterrupt
        if signal.getsignal(signal.SIGTERM) is not cli._raise_terminated:  # SIGTERM would end pytest itself
            raise RuntimeError("a write outside run_cli's SIGTERM handler")
        os.kill(os.getpid(), signal.SIGTERM)

    def opened(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            hit(file)
        return real_open(file, mode, *args, **kwargs)

    def os_opened(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            hit(path)
        return real_os_open(path, flags, *args, **kwargs)

    with mock.patch.object(builtins, "open", opened), mock.patch.object(os, "open", os_opened):
        yield state


@contextlib.contextmanager
def held_lock(spec, argv):
    """The case's --out locked by another run (utils.outdir.claim_out_dir held here; yields {"met": True}), or
    nothing when --out cannot be claimed or the case writes nothing there (--check, --dry-run)."""
    from vq4dit.utils.errors import UserError
    from vq4dit.utils.outdir import claim_out_dir

    out = last(argv, "--out") if "--out" in argv[:-1] else None
    with contextlib.ExitStack() as stack:
        try:
            if out and spec.produces(argv):
                stack.enter_context(claim_out_dir(out, (), overwrite=True))
                yield {"met": True}
                return
        except UserError:
            pass
        yield {"met": False}


def pick_hazard(rng, spec):
    """None, or (kind, the number of the write it hits) for a share of the cases."""
    if rng.random() >= HAZARD_SHARE:
        return None
    kinds = WRITE_HAZARDS + (("locked",) if spec.claims else ())
    return rng.choice(kinds), rng.randint(1, spec.writes)


def judge(result, line, hazard, state, argv):
    """What is wrong with a case's (outcome, last line) under `hazard` (None: nothing), or None."""
    if state["met"]:
        kind = hazard[0]
        want, text = MET[kind]
        if kind == "locked":  # refused: an error (another run, or a flag checked before the claim) or usage
            return None if result in ("error", "usage") else f"{result} while another run held --out"
        return None if (result, text in line) == (want, True) else f"{result} ({line!r}) after {kind}"
    if result not in ("ok", "usage", "error"):
        return result
    if result == "ok" and any(not a.strip() for a in argv):  # an empty value must not fall back silently
        return "ok with an empty value"
    return None
