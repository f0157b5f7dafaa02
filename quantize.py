"""`python quantize.py ...` from a clone: the same command as `vq4dit-quantize` (vq4dit/cli/quantize.py), which pip
installs."""
from vq4dit.cli.quantize import cli

if __name__ == "__main__":
    cli()
