"""utils.digest.sampled_digest: a checkpoint's identity, cheap for multi-GB files, checked against a plain reference."""
import hashlib
import os
import shutil

from vq4dit.utils.digest import SLICE, file_sha256, sampled_digest


def reference_file_digest(data):
    """The sampled digest of a file's bytes written out plainly: size, then the slices (the whole file if small)."""
    size = len(data)
    parts = [data] if size <= 3 * SLICE else [data[:SLICE], data[size // 2 - SLICE // 2:size // 2 + SLICE // 2],
                                              data[-SLICE:]]
    inner = hashlib.sha256(str(size).encode() + b"".join(parts)).hexdigest()
    return hashlib.sha256(inner.encode()).hexdigest()[:16]


def test_a_large_file_digests_its_size_and_three_slices(tmp_path):
    """Mutations: one slice at a wrong offset, the size left out, the whole file hashed (the edit between the slices
    would then be seen)."""
    data = bytearray(os.urandom(3 * SLICE + 12345))
    path = tmp_path / "ckpt.bin"
    path.write_bytes(data)
    assert sampled_digest(path) == reference_file_digest(bytes(data))
    for offset in (0, len(data) // 2, len(data) - 1):  # a byte in each slice changes the digest
        changed = bytearray(data)
        changed[offset] ^= 1
        path.write_bytes(changed)
        assert sampled_digest(path) == reference_file_digest(bytes(changed)) != reference_file_digest(bytes(data))
    changed = bytearray(data)
    changed[SLICE + 10] ^= 1  # between head and middle: not read, by design
    path.write_bytes(changed)
    assert sampled_digest(path) == reference_file_digest(bytes(data))


def test_a_small_file_digests_every_byte_and_not_its_mtime(tmp_path):
    path, copy = tmp_path / "prompts.txt", tmp_path / "copy.txt"
    path.write_bytes(b"a cat\na dog\n")
    shutil.copy(path, copy)
    os.utime(copy, (1, 1))
    assert sampled_digest(path) == sampled_digest(copy) == reference_file_digest(b"a cat\na dog\n")
    path.write_bytes(b"a cat\na dog.\n")
    assert sampled_digest(path) != sampled_digest(copy)


def test_a_directory_digests_its_files_by_relative_name_and_skips_hidden_entries(tmp_path):
    """A diffusers directory: a changed weight file, or a file renamed, changes the digest; a hub download's
    .cache/ metadata does not (mutations: names left out, hidden entries included)."""
    root = tmp_path / "pipe"
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text("{}")
    (root / "transformer" / "weights.bin").write_bytes(b"\0" * 100)
    before = sampled_digest(root)
    (root / ".cache").mkdir()
    (root / ".cache" / "weights.bin.metadata").write_text("etag, timestamp")
    (root / ".lock").write_text("")
    assert sampled_digest(root) == before
    (root / "transformer" / "weights.bin").write_bytes(b"\1" * 100)
    assert sampled_digest(root) != before
    (root / "transformer" / "weights.bin").write_bytes(b"\0" * 100)
    assert sampled_digest(root) == before
    (root / "transformer" / "weights.bin").rename(root / "transformer" / "other.bin")
    assert sampled_digest(root) != before


def test_file_sha256_is_the_sha256_of_every_byte(tmp_path):
    data = os.urandom(SLICE * 2 + 7)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
