"""python -m vq4dit quantize|sample|evaluate [flags]: the same commands as vq4dit-quantize, vq4dit-sample and
vq4dit-evaluate; python -m vq4dit --version."""
import importlib
import sys

COMMANDS = ("quantize", "sample", "evaluate")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from vq4dit import __version__

        print(f"vq4dit {__version__}")
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(f"usage: python -m vq4dit {{{','.join(COMMANDS)}}} [flags]  ({given}see python -m vq4dit quantize "
              "--help)", file=sys.stderr if given else sys.stdout)
        raise SystemExit(2 if given or not argv else 0)
    sys.argv = [f"python -m vq4dit {argv[0]}"] + argv[1:]  # argparse names the program from it
    importlib.import_module(f"vq4dit.cli.{argv[0]}").cli(argv[1:])


if __name__ == "__main__":
    main()
