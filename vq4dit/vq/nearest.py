"""Chunked nearest-codeword search, shared by k-means (nearest + second nearest) and the candidate sets (n nearest).

Squared distances as ||c||^2 - 2 x c^T (one addmm per chunk) plus ||x||^2, chunked so the (chunk, k) block stays in
cache on CPU and bounded in memory on a GPU. Pure functions of tensors, on the device of `x`.
"""
import torch

DEFAULT_CHUNK = 4096  # rows per distance block: (4096, 256) fp32 = 4 MiB, cache-sized on CPU
# off the CPU a block of at least this many distances (64 MiB in fp32; 65536 rows at k = 256): at 4096 rows each
# block's half-dozen small kernels cost their launches more than their work, and k-means runs thousands of blocks
GPU_CHUNK_ELEMENTS = 1 << 24


def chunk_rows(chunk_size, k, device):
    """Rows per distance block of a k-codeword search on `device`: `chunk_size` on a CPU, at least
    GPU_CHUNK_ELEMENTS / k elsewhere. Each row's result is its own whatever the block (only the block's size
    changes, so a GPU's float roundings may differ from a 4096-row block's; runs stay deterministic)."""
    return chunk_size if device.type == "cpu" else max(chunk_size, GPU_CHUNK_ELEMENTS // max(k, 1))


def distance_chunks(x, codebook, chunk_size=DEFAULT_CHUNK):
    """Yield (rows, part, x_sq) per chunk of x (N, d) against codebook (k, d): rows the slice of x, part (c, k) =
    ||c||^2 - 2 x c^T and x_sq (c,) = ||x||^2, so part + x_sq[:, None] is the squared distance. `part` is fresh
    for every chunk: callers may overwrite it. Chunks of chunk_rows(chunk_size, k, x.device) rows."""
    c_sq = (codebook * codebook).sum(1)  # (k,)
    ct = codebook.t().contiguous()  # (d, k)
    chunk_size = chunk_rows(chunk_size, codebook.shape[0], x.device)
    for s in range(0, x.shape[0], chunk_size):
        xs = x[s:s + chunk_size]  # (c, d)
        yield slice(s, s + xs.shape[0]), torch.addmm(c_sq, xs, ct, beta=1.0, alpha=-2.0), (xs * xs).sum(1)


def nearest_two(x, codebook, chunk_size=DEFAULT_CHUNK):
    """Nearest and second-nearest codeword of every point (k-means' assignment step).

    x (N, d), codebook (k, d) -> (index (N,) int64, sqdist (N,), sqdist2 (N,)): sqdist the squared distance to
    codeword `index`, sqdist2 the squared distance to the second nearest (inf when k == 1).
    """
    n, k = x.shape[0], codebook.shape[0]
    index = torch.empty(n, dtype=torch.int64, device=x.device)
    sqdist = torch.empty(n, dtype=x.dtype, device=x.device)
    sqdist2 = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    for rows, part, x_sq in distance_chunks(x, codebook, chunk_size):
        # ||x||^2 does not change the ranking: add it to the two minima only
        m, i = part.min(1)
        index[rows] = i
        # the expansion can go slightly negative through cancellation; a distance cannot
        sqdist[rows] = (m + x_sq).clamp_min_(0)
        if k > 1:  # second nearest: hide the nearest, then a value-only reduction (much cheaper than topk)
            part.scatter_(1, i[:, None], float("inf"))
            sqdist2[rows] = (part.amin(1) + x_sq).clamp_min_(0)
    return index, sqdist, sqdist2


def nearest_n(x, codebook, n, chunk_size=DEFAULT_CHUNK):
    """The n nearest codewords of every point, closest first.

    x (N, d), codebook (k, d), 1 <= n <= k -> (index (N, n) int64, sqdist (N, n) squared distances, x.dtype).
    """
    index = torch.empty(x.shape[0], n, dtype=torch.int64, device=x.device)
    sqdist = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for rows, part, x_sq in distance_chunks(x, codebook, chunk_size):
        d_n, i_n = (part + x_sq[:, None]).topk(n, dim=1, largest=False, sorted=True)  # (c, n)
        index[rows] = i_n
        sqdist[rows] = d_n.clamp_min_(0)
    return index, sqdist
