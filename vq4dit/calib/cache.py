"""Where calibration activations live: in memory up to a budget, in memory-mapped files beyond it.

Every cached tensor has one row per calibration point, e.g. (M, T, D) block inputs. For DiT-XL/2 at the defaults
one such tensor is 900 MiB; at 512 px, or for a large text-to-image transformer, a few of them exceed the memory
of most machines. Tensors past `max_bytes` are created with torch.from_file(shared=True): writes go to a file in
`cache_dir`, the page cache holds what fits, and the rows of a minibatch are read on demand.
"""
import contextlib
import errno
import logging
import os

import torch

from vq4dit.utils.fileio import DISK_FULL, disk_full_error

logger = logging.getLogger(__name__)


def dtype_bytes(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def reserve(path, nbytes):
    """Create `path` with `nbytes` allocated on disk (posix_fallocate), so that a full disk is a UserError here,
    naming the path and the bytes, and never a SIGBUS when a page of the mapping is first written; on failure the
    file is removed."""
    with open(path, "wb") as f:  # replaces a stale file of a crashed run with the same pid
        try:
            if nbytes > 0:
                os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: map it unreserved
                logger.warning("activation cache: %s cannot reserve %d bytes (%s); a full disk will end the run "
                               "with SIGBUS", path, nbytes, e.strerror)
                return
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            if e.errno in DISK_FULL:
                raise disk_full_error([path], nbytes) from None
            raise


class ActivationStore:
    """Allocates cache tensors; `release` frees one (and deletes its file)."""

    def __init__(self, max_bytes=None, cache_dir=None, token_dtype=torch.float16):
        self.max_bytes = max_bytes  # None: no limit
        self.cache_dir = cache_dir
        self.token_dtype = token_dtype  # how recorded token activations (3+ dimensions) are stored
        self.in_memory = 0  # bytes held in memory now
        self.peak = 0
        self._files = {}  # id(tensor) -> path of a file-backed tensor
        self._count = 0
        self._made_dir = False  # whether this store created cache_dir (removed on close once empty)

    def empty(self, shape, dtype):
        nbytes = dtype_bytes(dtype)
        for s in shape:
            nbytes *= s
        if self.max_bytes is None or self.in_memory + nbytes <= self.max_bytes or self.cache_dir is None:
            self.in_memory += nbytes
            self.peak = max(self.peak, self.in_memory)
            return torch.empty(shape, dtype=dtype)
        if not os.path.isdir(self.cache_dir):
            with contextlib.suppress(FileExistsError):  # made meanwhile by another run: not this store's
                os.makedirs(self.cache_dir)
                self._made_dir = True
        path = os.path.join(self.cache_dir, f"act-{os.getpid()}-{self._count}.bin")
        self._count += 1
        numel = nbytes // dtype_bytes(dtype)
        reserve(path, nbytes)
        tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        self._files[id(tensor)] = path
        logger.info("activation cache: %.2f GiB in %s (memory budget of %.2f GiB reached)", nbytes / 2**30, path,
                    self.max_bytes / 2**30)
        return tensor

    def adopt(self, tensor):
        """Count a tensor made elsewhere (e.g. loaded from a saved state) as held in memory."""
        self.in_memory += tensor.numel() * tensor.element_size()
        self.peak = max(self.peak, self.in_memory)
        return tensor

    def release(self, tensor):
        path = self._files.pop(id(tensor), None)
        if path is None:
            self.in_memory -= tensor.numel() * tensor.element_size()
        elif os.path.exists(path):
            os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for path in self._files.values():
            if os.path.exists(path):
                os.remove(path)
        self._files.clear()
        if self._made_dir:  # an empty directory left in a finished artifact (or where --cache-dir named a new one)
            with contextlib.suppress(OSError):  # not empty: another run's files are there
                os.rmdir(self.cache_dir)
            self._made_dir = False
