import errno
import os

import pytest

from vq4dit.utils.errors import UserError
from vq4dit.utils.fileio import atomic_path, atomic_paths, write_text_atomic


def test_success_renames_onto_target_with_normal_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text_atomic(target, "hello")
    assert target.read_text() == "hello"
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert os.listdir(target.parent) == ["out.txt"]


def test_failure_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_failure_keeps_previous_complete_file(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "w").write("new but unfinished")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("target", ["devnull", "dir"])
def test_a_target_that_is_not_a_regular_file_is_refused_and_kept(tmp_path, target):
    """As root, renaming a temporary onto /dev/null replaces the device with a file (evaluate.py --json /dev/null
    did); the link to /dev/null stands for it here, so a regression cannot touch the real one."""
    path = tmp_path / target
    if target == "devnull":
        os.symlink(os.devnull, path)
    else:
        path.mkdir()
    with pytest.raises(UserError, match=f"{path}: exists and is not a regular file"):
        write_text_atomic(path, "x")
    assert (os.readlink(path) == os.devnull) if target == "devnull" else path.is_dir()
    assert sorted(os.listdir(tmp_path)) == [target]


def test_a_full_disk_names_the_files_and_bytes_and_leaves_nothing(tmp_path, monkeypatch):
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(UserError) as info:
        with atomic_paths([tmp_path / "a.npz", tmp_path / "b.png"], needed=12345) as (a, b):
            open(a, "wb")
    assert str(info.value).startswith(f"{tmp_path / 'a.npz'} + {tmp_path / 'b.png'}: no space left on the device "
                                      "(needed 12,345 bytes, ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error, says", [
    (OSError(errno.EFBIG, "File too large", "/data/a.npz"), "file-size limit (ulimit -f)"),
    (OSError(errno.EROFS, "Read-only file system", "/data/a.npz"), "read-only"),
    (RuntimeError("Error while serializing: I/O error: Read-only file system (os error 30)"), "read-only"),
])
def test_a_write_the_file_system_refuses_is_one_line_naming_why(error, says):
    """EFBIG and EROFS, as OSErrors or in a writer's text (safetensors), are UserErrors naming the file and the
    reason; other errors are not (mutation: the errno table left out -> None, a traceback at the CLI)."""
    from vq4dit.utils.fileio import disk_full

    named = disk_full(error, ["/data/a.npz"])
    assert isinstance(named, UserError) and str(named).startswith("/data/a.npz: cannot be written: ")
    assert says in str(named)
    assert disk_full(ValueError("File too small")) is None


@pytest.mark.parametrize("kind,what", [("file", "a file"), ("dangling link", "a link to nothing"),
                                       ("link to a file", "a link to a file")])
def test_an_output_directory_that_is_a_file_says_so(tmp_path, kind, what):
    """--out naming a file (or a link to nothing) said "cannot create output directory X: File exists"; it now
    says what X is, and leaves it (mutation: the check left out -> the old text; a link to a file called a link to
    nothing, as a fourth new user's trial found)."""
    from vq4dit.utils.fileio import check_out_dir

    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file")
    else:
        (tmp_path / "afile").write_text("a file")
        out.symlink_to(tmp_path / ("afile" if kind == "link to a file" else "nowhere"))
    with pytest.raises(UserError, match=f"output directory {out}: is {what}, not a directory"):
        check_out_dir(str(out))
    assert os.path.lexists(out)
