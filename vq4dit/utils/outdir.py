"""Output directories: a tool writes only its own files there, and one run at a time.

A directory a tool has written holds the marker MARKER, created when a run first claims the directory. In a marked
directory the names the tool writes are its own: a rerun replaces them (and resumes a calibration state). Every
other entry is foreign: refused unless `overwrite`, and even then never replaced or deleted. In a directory
without the marker the tool's names are foreign too (a project's README.md, a pipeline's config.yaml): refused even
with `overwrite`, since writing would replace them, unless `earlier(directory)` recognises the output of a run from
before markers existed.

The marker also says which tool wrote the directory ("tool": a quantized artifact, samples), so that a tool given
another tool's directory says what it is; and a subdirectory holding its own marker (sample.py's output inside an
artifact, as the README lays them out) is vq4dit's too: kept, never replaced, and no reason to refuse a rerun.

The marker is also the lock: a run holds fcntl.flock on it while it writes, so a second run into the same directory
is refused naming the holder's pid, and the OS drops the lock when the process ends, however it ends (a killed
run leaves no stale lock).
"""
import contextlib
import fcntl
import json
import os

from vq4dit.utils.errors import UserError
from vq4dit.utils.fileio import check_out_dir, disk_full, temporary_target

MARKER = ".vq4dit"  # {"pid": the run holding or last holding the lock, "tool": what it writes there}
SHOWN = 3  # foreign entries named in an error


def _is_own(entry, names):
    """One of `names`, or the temporary of one (utils.fileio.temporary_name) a kill left behind."""
    return entry in names or temporary_target(entry) in names


def _listing(entries):
    shown = ", ".join(entries[:SHOWN])
    return shown + (f" and {len(entries) - SHOWN} more" if len(entries) > SHOWN else "")


def _nested_output(out_dir, entry):
    """Whether `entry` of `out_dir` is a directory another vq4dit run wrote (it holds its own marker)."""
    return os.path.isfile(os.path.join(out_dir, entry, MARKER))


def check_foreign(out_dir, names, marked, overwrite, flag, tools=(None, None)):
    """Refuse the entries of `out_dir` that the tool writing `names` did not write (see the module docstring);
    `tools`: (what this tool writes, what the marker says the directory holds: None when it does not say)."""
    entries = sorted(e for e in os.listdir(out_dir) if e != MARKER and not _nested_output(out_dir, e))
    if not marked:
        clash = [e for e in entries if _is_own(e, names)]
        if clash:
            raise UserError(f"{out_dir}: holds {_listing(clash)}, not written by vq4dit (no {MARKER} marker), which "
                            f"the output would replace; give a new or empty directory ({flag} never replaces "
                            "files vq4dit did not write)")
    foreign = [e for e in entries if not _is_own(e, names)]
    if foreign and not overwrite:
        tool, held = tools
        if marked and held is not None and held != tool:
            raise UserError(f"{out_dir}: holds {held} ({_listing(foreign)}), not {tool}; give another directory "
                            f"(a new subdirectory of it will do), or pass {flag} to write beside it (it is kept)")
        raise UserError(f"{out_dir}: holds files vq4dit did not write ({_listing(foreign)}); give a new or empty "
                        f"directory, or pass {flag} to write beside them (they are kept)")


def _open_marker(path):
    """(descriptor, whether this call created the file) of the marker at `path`."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW), False


def _lock(path, out_dir):
    """(descriptor holding flock on the marker at `path`, whether this call created it); a UserError naming the
    holder's pid when another process holds it."""
    while True:
        try:
            fd, created = _open_marker(path)
        except FileNotFoundError:  # removed between the two opens by a refused run: try again
            continue
        except OSError as e:
            raise (disk_full(e, [path]) or UserError(f"{path}: cannot open the output directory's marker "
                                                     f"({e.strerror}); remove it")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_marker(fd).get("pid", "unknown")
            os.close(fd)
            raise UserError(f"{out_dir}: another run (pid {pid}) is writing to it; wait for it to end or give "
                            "another directory") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, created
        os.close(fd)  # locked a marker a refused run had just removed: lock the one there now


def _read_marker(fd):
    """The marker's content ({} when it is empty or unreadable: a marker from before it held anything)."""
    try:
        content = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


@contextlib.contextmanager
def _marker_read_only(out_dir):
    """The marker of `out_dir` opened for reading (its descriptor), or None where there is none."""
    try:
        fd = os.open(os.path.join(out_dir, MARKER), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)  # closing drops a lock taken on it


def writer_of(out_dir):
    """The pid of another run writing `out_dir` now (it holds the marker's lock), or None; None also inside this
    process's own claim, whose marker names this process (its lock refuses this process's other descriptors too)."""
    with _marker_read_only(out_dir) as fd:
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_marker(fd).get("pid", "unknown")
            return None if pid == os.getpid() else pid
    return None


def held_by(out_dir):
    """What the marker of `out_dir` says the directory holds ("a quantized artifact", ...); None without a marker or
    when it does not say."""
    with _marker_read_only(out_dir) as fd:
        return None if fd is None else _read_marker(fd).get("tool")


def _write_pid(fd, path, tool):
    """The marker's content: this run's pid and what it writes (a full disk is the one-line error of any write)."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "tool": tool}).encode() + b"\n", 0)
    except OSError as e:
        raise (disk_full(e, [path]) or e) from None


def _missing_dirs(path):
    """The directories that creating `path` would create, deepest first."""
    missing, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    return missing


def _remove_empty(directories):
    """Remove `directories` (deepest first) as long as they are empty."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:  # not empty (another process wrote there meanwhile), or never created
            if os.path.exists(directory):
                return


@contextlib.contextmanager
def claim_out_dir(out_dir, names, overwrite=False, flag="--overwrite", earlier=None, tool=None):
    """Create `out_dir` if needed, lock it for this process and check that it holds no file the tool did not write
    (`names`: the entries the tool writes there; `overwrite`: allow foreign entries, never replacing them; `flag`:
    how the caller's user says overwrite, for messages; `earlier(out_dir)`: True when an unmarked directory is the
    output of a run from before markers existed; `tool`: what the tool writes, e.g. "a quantized artifact", kept in
    the marker for messages). The lock is released on leaving, however the block ends. When the
    block (or the claim) fails and the run wrote nothing there, nothing is left behind: a marker this call created is
    removed, and so are the directories it created."""
    created_dirs = _missing_dirs(out_dir)
    path = os.path.join(out_dir, MARKER)
    try:
        check_out_dir(out_dir)
        fd, created = _lock(path, out_dir)
    except BaseException:
        _remove_empty(created_dirs)
        raise
    before = set(os.listdir(out_dir))
    try:
        check_foreign(out_dir, set(names), not created or (earlier is not None and earlier(out_dir)), overwrite,
                      flag, (tool, _read_marker(fd).get("tool")))
        _write_pid(fd, path, tool)
        yield
    except BaseException:
        if created and set(os.listdir(out_dir)) <= before:  # refused, or failed before writing anything
            os.remove(path)
            _remove_empty(created_dirs)
        raise
    finally:
        os.close(fd)
