"""`python evaluate.py ...` from a clone: the same command as `vq4dit-evaluate` (vq4dit/cli/evaluate.py), which pip
installs."""
from vq4dit.cli.evaluate import cli

if __name__ == "__main__":
    cli()
