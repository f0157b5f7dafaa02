"""The one way entry scripts end: a UserError is one line on stderr and exit status 2, never a traceback."""
import sys

from utils.errors import UserError


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
