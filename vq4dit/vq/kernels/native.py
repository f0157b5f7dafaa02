"""A native CPU gather for the decode: codewords copied by their stored indices, read in their own dtype.

Why (docs/results.md#decoding-speed): torch's index_select takes only int32 or int64 indices, so a decode first
casts the layer's uint8 indices into an int32 scratch, and its loop costs about 3 ns per 16-byte codeword on this
CPU, one thread or two; the plain C loop below reads the uint8 indices directly and copies each codeword as one
scalar of its width, about 1.5 ns one thread, split over the torch thread count for a large layer.

The C source is compiled once with the system C compiler (`cc`, or $CC) into the user cache directory
($VQ4DIT_CACHE, else $XDG_CACHE_HOME/vq4dit, else ~/.cache/vq4dit), under a name that is the hash of the source,
the flags, the compiler and the machine type, written atomically, and loaded with ctypes. Where there is no
compiler, the build or the load fails, or VQ4DIT_NATIVE=0, `native_gather()` returns None and the decode gathers
with index_select: the two write the same bytes (tests/vq/test_decode.py runs every decode test both ways). Every
index is checked against the codebook size, as index_select does: an index out of range raises IndexError instead
of reading outside the codebook.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

logger = logging.getLogger(__name__)

SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <string.h>

typedef struct { uint64_t lo, hi; } w16;

typedef struct {
  const void* table; int64_t k, width; const void* idx; int idx_bytes; void* out; int64_t begin, end, bad;
} job_t;

#define COPY(T, I) for (int64_t i = j->begin; i < j->end; i++) { \
    uint64_t x = (uint64_t)((const I*)j->idx)[i]; \
    if (x >= (uint64_t)j->k) { j->bad = i + 1; return; } \
    ((T*)j->out)[i] = ((const T*)j->table)[x]; }
#define COPY_BYTES(T, I) for (int64_t i = j->begin; i < j->end; i++) { \
    uint64_t x = (uint64_t)((const I*)j->idx)[i]; \
    if (x >= (uint64_t)j->k) { j->bad = i + 1; return; } \
    memcpy((char*)j->out + i * j->width, (const char*)j->table + x * j->width, j->width); }
#define BY_INDEX(MACRO, T) switch (j->idx_bytes) { \
    case 1: MACRO(T, uint8_t) break; \
    case 2: MACRO(T, int16_t) break; \
    case 4: MACRO(T, int32_t) break; \
    default: MACRO(T, int64_t) }

static void run(job_t* j) {  /* positions [begin, end) from one table */
  switch (j->width) {
    case 1: BY_INDEX(COPY, uint8_t) break;
    case 2: BY_INDEX(COPY, uint16_t) break;
    case 4: BY_INDEX(COPY, uint32_t) break;
    case 8: BY_INDEX(COPY, uint64_t) break;
    case 16: BY_INDEX(COPY, w16) break;
    default: BY_INDEX(COPY_BYTES, char)  /* T unused: `width` bytes */
  }
}

typedef struct { job_t whole; int64_t groups, begin, end, bad; } share_t;

static void* run_share(void* arg) {  /* a thread's positions [begin, end), table by table */
  share_t* s = (share_t*)arg;
  int64_t n = s->whole.end, per_group = n / s->groups;
  for (int64_t g = s->begin / per_group; g < s->groups && g * per_group < s->end; g++) {
    job_t j = s->whole;
    j.table = (const char*)s->whole.table + g * s->whole.k * s->whole.width;
    j.begin = s->begin > g * per_group ? s->begin : g * per_group;
    j.end = s->end < (g + 1) * per_group ? s->end : (g + 1) * per_group;
    run(&j);
    if (j.bad) { s->bad = j.bad; break; }
  }
  return 0;
}

/* out[i] = table[g][idx[i]] for i < n, g = i / (n / groups), table[g] the g-th k entries of `width` bytes, over
   `threads` threads (this one included). Returns 0, or 1 + the position of an index >= k (nothing is read outside
   the table). */
int64_t vq_gather(const void* table, int64_t k, int64_t width, const void* idx, int idx_bytes, void* out,
                  int64_t n, int64_t groups, int threads) {
  share_t shares[64];
  pthread_t tids[64];
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (n == 0) return 0;
  for (int t = 0; t < threads; t++) {
    share_t s = {{table, k, width, idx, idx_bytes, out, 0, n, 0}, groups, n * t / threads, n * (t + 1) / threads, 0};
    shares[t] = s;
  }
  int started = 0;
  for (int t = 1; t < threads; t++) {
    if (pthread_create(&tids[t], 0, run_share, &shares[t]) != 0) break;
    started = t;
  }
  for (int t = started + 1; t < threads; t++) run_share(&shares[t]);  /* threads that could not start: run here */
  run_share(&shares[0]);
  for (int t = 1; t <= started; t++) pthread_join(tids[t], 0);
  for (int t = 0; t < threads; t++) if (shares[t].bad) return shares[t].bad;
  return 0;
}
"""
FLAGS = ["-O3", "-fPIC", "-shared", "-pthread"]
PARALLEL_MIN = 1 << 16  # codewords per thread at least: a thread's start (~30 us) costs more than a smaller share
# saves, and a machine with many cores would otherwise start dozens of threads for a middling layer


def cache_dir():
    """Where the compiled gather is kept: $VQ4DIT_CACHE, else $XDG_CACHE_HOME/vq4dit, else ~/.cache/vq4dit."""
    if os.environ.get("VQ4DIT_CACHE"):
        return os.environ["VQ4DIT_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vq4dit")


def build(compiler, directory):
    """Compile SOURCE with `compiler` into `directory` (once per source, flags, compiler and machine type) -> the
    library path. Raises OSError or subprocess.CalledProcessError when it cannot."""
    digest = hashlib.sha256("\0".join([SOURCE, *FLAGS, compiler, platform.machine()]).encode()).hexdigest()[:16]
    path = os.path.join(directory, f"vq_gather-{digest}.so")
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # a build of its own: concurrent processes race safely
        src, lib = os.path.join(tmp, "vq_gather.c"), os.path.join(tmp, "vq_gather.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        subprocess.run([compiler, *FLAGS, src, "-o", lib], check=True, capture_output=True, timeout=120)
        os.replace(lib, path)
    return path


@functools.cache
def _load():
    """The loaded vq_gather function, or None (logged once) where it cannot be built or loaded."""
    if os.environ.get("VQ4DIT_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        logger.info("no C compiler (cc or $CC): quantized layers decode with torch.index_select on the CPU")
        return None
    try:
        lib = ctypes.CDLL(build(compiler, cache_dir()))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        logger.warning("could not build or load the native decode in %s (%s%s): decoding with torch.index_select "
                       "instead (VQ4DIT_CACHE names another directory, VQ4DIT_NATIVE=0 skips the build)",
                       cache_dir(), err, ": " + detail.decode(errors="replace")[-500:] if detail else "")
        return None
    fn = lib.vq_gather
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    fn.restype = ctypes.c_int64
    return fn


class BoundGather:
    """One layer's gather bound to its tensors (see native_gather); holds them, so the memory it points at lives."""

    def __init__(self, fn, table, indices, out):
        self.fn, self.table, self.indices, self.out = fn, table, indices, out
        groups, self.k = table.shape[0], table.shape[1]
        self.n = out.shape[0]
        width = table[0, 0].nbytes if self.k else 0
        self.head = (table.data_ptr(), self.k, width, indices.data_ptr(), indices.element_size())
        self.tail = (self.n, groups)
        self.max_threads = max(1, self.n // PARALLEL_MIN)

    def __call__(self, threads):
        bad = self.fn(*self.head, self.out.data_ptr(), *self.tail, min(threads, self.max_threads))
        if bad:
            raise IndexError(f"index {int(self.indices[bad - 1])} out of range for a codebook of {self.k} codewords")
        return self.out


def native_gather():
    """bind(table, indices, out) -> run(threads) -> out, which writes out[i] = table[g][indices[i]] (g: the group of
    position i, the g-th n / G of them) on contiguous CPU tensors: table (G, k, ...) and out (n, ...) of one dtype
    and row size (codebook rows, or rows viewed as one wide scalar each: see decode.gather_plan), indices (n,) of
    any integer dtype, read as stored at each run; up to `threads` threads, each with PARALLEL_MIN codewords or
    more. None where the native code is not available. The table and indices stay where they were at bind; out's
    memory is looked up at each run (a workspace buffer may have grown)."""
    fn = _load()
    if fn is None:
        return None
    return functools.partial(BoundGather, fn)
