"""Atomic file output: write to a temporary name in the same directory, then rename.

An interrupted run therefore never leaves a file that looks complete, and a full disk (ENOSPC, or a quota: EDQUOT)
is a one-line UserError naming the file and, where the caller knows it, how many bytes were needed.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from typing import NamedTuple

from vq4dit.utils.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# the same errors as writers that are not Python's file objects report them (safetensors' save_file raises a
# SafetensorError "I/O error: No space left on device (os error 28)")
DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b")
# other writes the file system refuses whatever the program does: a file past the file system's or the process's
# size limit (ulimit -f; FAT32's 4 GiB), a read-only mount; the text: as safetensors reports them
WRITE_REFUSED = {errno.EFBIG: "the file is larger than the file system or the process's file-size limit (ulimit -f) "
                              "allows", errno.EROFS: "the file system is read-only"}
WRITE_REFUSED_TEXT = {errno.EFBIG: re.compile(r"File too large|os error 27\b"),
                      errno.EROFS: re.compile(r"Read-only file system|os error 30\b")}


def disk_full_error(paths, needed=None):
    """The UserError for a full disk while writing the files `paths` (one directory; `needed`: the bytes the whole
    write needs, if known)."""
    directory = os.path.dirname(os.path.abspath(paths[0]))
    try:
        free = f"{shutil.disk_usage(directory).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"needed {needed:,} bytes, " if needed is not None else ""
    names = " + ".join(map(str, paths))
    return UserError(f"{names}: no space left on the device ({need}{free} under {directory}); free some space or "
                     "write elsewhere")


def disk_full(error, paths=None, needed=None):
    """The one-line UserError of `error` when it is a full disk (an OSError ENOSPC or EDQUOT, or another writer's
    exception saying so) or another write the file system refuses (WRITE_REFUSED), naming `paths` (default: the
    OSError's file name), else None."""
    text = "" if isinstance(error, UserError) else str(error)
    code = error.errno if isinstance(error, OSError) else None
    refused = code if code in WRITE_REFUSED else next((c for c, found in WRITE_REFUSED_TEXT.items()
                                                       if found.search(text)), None)
    if code in DISK_FULL or DISK_FULL_TEXT.search(text) or refused is not None:
        names = [os.fspath(n) for n in paths or [getattr(error, "filename", None) or "a file"]]
    else:
        return None
    if refused is not None:
        return UserError(f"{' + '.join(names)}: cannot be written: {WRITE_REFUSED[refused]}; write elsewhere")
    return disk_full_error(names, needed)


def free_bytes(path):
    """The bytes free on the file system that holds `path` (a file or directory, existing or not)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def check_free_space(path, needed, what):
    """UserError before any work when the file system holding `path` (a file or directory, existing or not) has
    fewer than `needed` bytes free; `what` names the files for the message."""
    free = free_bytes(path)
    if needed > free:
        raise UserError(f"{path}: {what} need about {needed:,} bytes but only {free:,} are free there; free some "
                        "space or write elsewhere")


def temporary_name(name):
    """The name of a temporary written before it is renamed onto `name`: .<name>.<8 hex>.tmp."""
    return f".{name}.{uuid.uuid4().hex[:8]}.tmp"


def temporary_target(entry):
    """The name the temporary `entry` (temporary_name's form) stands for, or None when it is not one."""
    parts = entry[1:].rsplit(".", 2)
    is_temporary = entry.startswith(".") and len(parts) == 3 and parts[2] == "tmp"
    return parts[0] if is_temporary else None


@contextlib.contextmanager
def atomic_paths(paths, needed=None):
    """Yield temporary paths beside `paths`; on success all are renamed onto their targets (so the files appear
    together: a failure before the renames leaves none of them), on any error all are removed. `needed`: the bytes
    the files take together, named by the error on a full disk."""
    paths = [os.fspath(p) for p in paths]
    for path in paths:  # renaming onto /dev/null (as root) or a directory would replace it
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path}: exists and is not a regular file; give a file name to write to")
    tmps = []
    try:
        for path in paths:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            # the name is recorded before the file exists: a Ctrl-C inside the creation (mkstemp's window between
            # creating the file and returning its name) would otherwise leave a temporary nobody removes
            tmp = os.path.join(directory, temporary_name(os.path.basename(path)))
            tmps.append(tmp)
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        yield tmps
        for tmp in tmps:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        full = disk_full(e, paths, needed)
        if full is not None:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_path(path, needed=None):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    with atomic_paths([path], needed) as (tmp,):
        yield tmp


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path, text):
    with atomic_path(path, needed=len(text.encode())) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def check_dir_usable(path, flag):
    """A directory flag's value (created later, when needed) must be a writable directory or not exist yet."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is not a directory; give a directory")
    if os.path.isdir(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: directory is not writable")
    if not os.path.lexists(path):
        check_creatable(path, flag, writable=False)


def check_out_dir(out_dir):
    """Create `out_dir` or fail early with a one-line error, before any expensive work."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        what = ("a link to a file" if os.path.exists(out_dir) else "a link to nothing") if os.path.islink(out_dir) \
            else "a file"
        raise UserError(f"output directory {out_dir}: is {what}, not a directory; give a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out_dir}: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output directory {out_dir} is not writable")


class ResultKind(NamedTuple):
    """A JSON result file a command writes: what it is, in words, and the keys every one of them holds."""

    what: str
    keys: tuple


def is_json_with(path, keys):
    """Whether the file at `path` holds a JSON object with every one of `keys` (a result a rerun may replace)."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and set(keys) <= set(content)


def check_result_file(flag, path, result, example):
    """A one-line UserError, before any work, when `flag`'s JSON result cannot be written at `path`: empty, a
    directory, a link or anything but a regular file, a file that is not an earlier result (a JSON object with
    every one of `result.keys`), which it would replace, or no writable directory to create it in. `result`: a
    ResultKind; `example`: a file name to suggest."""
    if not path.strip():
        raise UserError(f"{flag} {path!r}: empty; give a file name, e.g. {example}")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UserError(f"{flag} {path}: is a directory; give a file name, e.g. {os.path.join(path, example)}")
    if os.path.islink(path):
        raise UserError(f"{flag} {path}: is a link, which the result would replace with a file; give the file "
                        f"itself or another name, e.g. {example}")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path}: exists and is not a regular file; give a file name, e.g. {example}")
    if os.path.isfile(path) and not is_json_with(path, result.keys):
        raise UserError(f"{flag} {path}: exists and is not {result.what}, which it would replace (a config, samples, "
                        f"a checkpoint?); give another file name, e.g. {example}")
    check_creatable(path, flag)


def check_creatable(path, flag, writable=True):
    """A UserError when `path`, which does not exist, could not be created: its nearest existing ancestor is not a
    directory (a file, say), or, when `writable`, not one this process may write in (a directory flag's path is
    made by the run, perhaps on another machine than a dry run's: only a file in the way is refused there)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or (writable and not os.access(parent, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot create it under {parent} (not a writable directory)")
