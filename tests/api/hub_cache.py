"""Put a local directory into a huggingface_hub cache as a hub download lays it out, for offline tests.

    <cache>/models--<owner>--<name>/blobs/<sha256 of the file>
    <cache>/models--<owner>--<name>/snapshots/<revision>/<path> -> ../../blobs/<sha256>  (relative symlinks)
    <cache>/models--<owner>--<name>/refs/main                  (the revision, no newline)
"""
import hashlib
import os
import shutil
from pathlib import Path


def put_in_hub_cache(cache, repo_id, source, revision="0123456789abcdef0123456789abcdef01234567"):
    """Copy every file under `source` into `cache` as repo `repo_id` at `revision`; returns the snapshot folder."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for path in sorted(Path(source).rglob("*")):
        if not path.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot

