"""User-facing errors: bad input that the entry scripts report in one line with exit status 2."""


class UserError(Exception):
    """A problem with what the user gave (a path, a value, a file): message names it and what is valid."""
