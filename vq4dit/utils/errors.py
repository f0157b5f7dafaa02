"""User-facing errors: bad input that the entry scripts report in one line with exit status 2."""


class UserError(Exception):
    """A problem with what the user gave (a path, a value, a file): message names it and what is valid."""


class RankError(UserError):
    """A UserError that one torchrun rank may meet alone (its memory, its device): whichever rank meets it prints it,
    where a plain UserError (the same flags and files on every rank) is printed by rank 0 only."""


class NonFiniteOutput(UserError):
    """A model's output (sampled images, a metric) holds NaN or Inf: the caller adds what it was computing."""


def check_finite_output(values, what):
    """Raise NonFiniteOutput when the array or tensor `values` holds NaN or Inf, naming `what` and how many."""
    import numpy as np
    import torch

    finite = torch.isfinite(values) if torch.is_tensor(values) else np.isfinite(np.asarray(values))
    bad = int((~finite).sum())
    if bad:
        raise NonFiniteOutput(f"{what} hold {bad:,} NaN/Inf value(s)")


def check_finite(tensors, source):
    """Raise a UserError naming `source` and the first floating tensor holding NaN or Inf."""
    import torch

    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise UserError(f"{source}: tensor {key} holds {bad} NaN/Inf value(s); the file is corrupt or the "
                            "model diverged, refusing to produce garbage images")


def error_detail(e):
    """An exception's message on one line for a UserError: its first line, and the next one too when the first only
    introduces it ("Error(s) in loading state_dict for X:" says nothing without its "size mismatch for ..."); the
    exception's type when it has no message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
