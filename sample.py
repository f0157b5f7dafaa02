"""`python sample.py ...` from a clone: the same command as `vq4dit-sample` (vq4dit/cli/sample.py), which pip
installs."""
from vq4dit.cli.sample import cli

if __name__ == "__main__":
    cli()
