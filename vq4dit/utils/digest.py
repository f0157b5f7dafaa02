"""Digests of files: the full sha256 of a file (an artifact's model.safetensors, which must match byte for byte) and
a cheap sampled digest of a file or a directory tree (the identity of a base model's checkpoint, see sampled_digest).
"""
import hashlib
import json
import os

SLICE = 1 << 20  # bytes of each sampled slice


def file_sha256(path):
    """The sha256 of every byte of the file at `path` (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sampled_digest(path):
    """A sha256 (hex, 16 digits) of a file's size and three fixed 1 MiB slices (head, middle, tail; a file of up to
    3 MiB whole), or of every file under a directory (relative names, sorted; hidden entries such as a hub
    download's .cache/ metadata skipped). The modification time is not part of it: a copy of the same file digests
    the same.

    Not a full hash: a checkpoint is GBs (DiT-XL/2 2.7 GB, a text-to-image pipeline 10-30 GB), and reading all of it
    on every start and resume would cost a minute or more; a different model or a retrained checkpoint differs in
    its size or in any slice of its weights. An edit of bytes outside the slices that keeps the size goes unseen.
    """
    h = hashlib.sha256()
    if os.path.isdir(path):
        for top, dirs, names in os.walk(path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                full = os.path.join(top, name)
                h.update(f"{os.path.relpath(full, path)}\0{_sampled_file(full)}\0".encode())
        return h.hexdigest()[:16]
    h.update(_sampled_file(path).encode())
    return h.hexdigest()[:16]


def _sampled_file(path):
    """The hex sha256 of a file's size and its head, middle and tail slices (the whole file when it is small)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        offsets = [0] if size <= 3 * SLICE else [0, size // 2 - SLICE // 2, size - SLICE]
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(SLICE if len(offsets) > 1 else size))
    return h.hexdigest()


def json_digest(value):
    """The sha256 (hex) of a JSON-able `value` as json.dumps writes it with sorted keys: what a run records of its key
    (quant_config.json's and samples.npz's run_key), so that a rerun of the same command can keep its output."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def prompts_digest(prompts):
    """A sha256 (hex, 16 digits) of a list of prompts, in order: what samples.npz records of its prompts and a
    sampling run's resume key holds, so that samples of other prompts are told apart."""
    return hashlib.sha256(json.dumps(list(prompts), default=str).encode()).hexdigest()[:16]
