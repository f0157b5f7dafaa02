"""The three commands: parse arguments, call the jobs. Installed as vq4dit-quantize, vq4dit-sample and
vq4dit-evaluate; also `python -m vq4dit quantize|sample|evaluate ...` and, from a clone, `python quantize.py ...`."""
