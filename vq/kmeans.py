"""k-means for codebook initialisation: greedy k-means++ seeding, chunked Lloyd iterations.

Pure functions of tensors; everything runs on the device of `x` (CPU or CUDA).

Speed levers (see benchmarks/bench_kmeans.py):
- distances as ||c||^2 - 2 x c^T (one addmm per chunk), ||x||^2 added only where needed, chunks sized so the
  (chunk, k) distance block stays in cache;
- k-means++ seeding on a random subsample (its quality barely depends on N once N >> k);
- Lloyd on a subsample first, then refinement iterations on all points until assignments settle.
"""
import logging
import math

import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 4096  # rows per distance block: (4096, 256) fp32 = 4 MiB, cache-sized on CPU


def nearest(x, centroids, chunk_size=DEFAULT_CHUNK):
    """Nearest centroid of every point: x (N, d), centroids (k, d) -> (index (N,) int64, sqdist (N,) x.dtype)."""
    n = x.shape[0]
    c_sq = (centroids * centroids).sum(1)  # (k,)
    index = torch.empty(n, dtype=torch.int64, device=x.device)
    sqdist = torch.empty(n, dtype=x.dtype, device=x.device)
    ct = centroids.t().contiguous()  # (d, k)
    for s in range(0, n, chunk_size):
        xs = x[s:s + chunk_size]  # (c, d)
        # ||c||^2 - 2 x.c is the squared distance minus ||x||^2, which does not change the argmin
        part = torch.addmm(c_sq, xs, ct, beta=1.0, alpha=-2.0)  # (c, k)
        m, i = part.min(1)
        index[s:s + chunk_size] = i
        # the expansion can go slightly negative through cancellation; a distance cannot
        sqdist[s:s + chunk_size] = (m + (xs * xs).sum(1)).clamp_min_(0)
    return index, sqdist


def kmeans_plusplus(x, k, generator, trials=None):
    """Greedy k-means++ seeding: x (N, d) -> centroids (k, d).

    Each new centroid is the best (lowest total potential) of `trials` points drawn with probability
    proportional to their squared distance to the nearest centroid so far (2 + ln k trials, as is usual).
    """
    n = x.shape[0]
    trials = trials or 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids[0] = x[first[0]]
    # (trials, N) layout: the per-trial potential sums and the chosen row are contiguous (4x faster than (N, trials))
    xt = x.t().contiguous()  # (d, N)
    x_sq = (xt * xt).sum(0)  # (N,)
    closest = ((x - centroids[0]) ** 2).sum(1)  # (N,) squared distance to the nearest chosen centroid
    for j in range(1, k):
        if closest.sum() <= 0:  # every point coincides with a centroid (duplicates): any point will do
            picks = torch.randint(n, (trials,), generator=generator, device=x.device)
        else:
            picks = torch.multinomial(closest, trials, replacement=True, generator=generator)  # (trials,)
        cand = x[picks]  # (trials, d)
        d_cand = torch.addmm(x_sq, cand, xt, alpha=-2.0)  # (trials, N): ||x||^2 - 2 c.x
        d_cand += (cand * cand).sum(1, keepdim=True)
        d_cand.clamp_min_(0)  # cancellation can go below zero; multinomial needs non-negative weights
        torch.minimum(d_cand, closest, out=d_cand)  # potential if candidate t were added
        best = d_cand.sum(1).argmin()
        centroids[j] = cand[best]
        closest = d_cand[best]
    return centroids


def lloyd(x, centroids, iters, tol=1e-4, chunk_size=DEFAULT_CHUNK):
    """Lloyd iterations from `centroids` (k, d) on x (N, d) -> (centroids, index (N,), sqdist (N,), iterations run).

    Stops early once fewer than `tol` of the points change cluster. Empty clusters are re-seeded with the points
    farthest from their centroid. Sums accumulate in float64 so that the (order-dependent) atomic adds on CUDA
    round to the same float32 centroids run after run.
    """
    k, d = centroids.shape
    n = x.shape[0]
    centroids = centroids.clone()
    index, sqdist = nearest(x, centroids, chunk_size)
    x64 = x.double()
    done = 0
    for done in range(1, iters + 1):
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, index, x64)  # (k, d)
        counts = torch.bincount(index, minlength=k)  # (k,)
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).to(x.dtype)
        empty = (~filled).nonzero().flatten()
        if len(empty):
            far = sqdist.topk(len(empty)).indices  # the worst-represented points become the new centroids
            centroids[empty] = x[far]
            logger.debug("re-seeded %d empty clusters", len(empty))
        new_index, sqdist = nearest(x, centroids, chunk_size)
        changed = (new_index != index).sum().item()
        index = new_index
        if changed < tol * n and not len(empty):
            break
    return centroids, index, sqdist, done


def kmeans(x, k, iters=100, seed=0, tol=1e-4, chunk_size=DEFAULT_CHUNK, seed_points_per_cluster=64,
           fit_points_per_cluster=512):
    """k-means of x (N, d) into k clusters -> (codebook (k, d), assignments (N,) int64).

    Deterministic for a given seed and device. k-means++ seeding sees at most `seed_points_per_cluster * k`
    random points; when N exceeds `fit_points_per_cluster * k`, up to `iters` Lloyd iterations first run on that
    many random points, then up to `iters` refinement iterations run on all points (they usually stop after a
    few, once fewer than `tol` of the assignments change). None for either disables that subsample.
    Requires N >= k.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects points of shape (N, d), got {tuple(x.shape)}")
    n = x.shape[0]
    if k < 1 or n < k:
        raise UserError(f"k-means with k={k} needs at least k points, got {n}; use a smaller codebook_size "
                        f"or a smaller dim")
    x = x.float()  # float32 arithmetic throughout, also for half-precision inputs
    g = torch.Generator(device=x.device).manual_seed(seed)

    def sample(per_cluster):
        if per_cluster is None or per_cluster * k >= n:
            return x
        return x[torch.randperm(n, generator=g, device=x.device)[:per_cluster * k]]

    centroids = kmeans_plusplus(sample(seed_points_per_cluster), k, g)
    fit_points = sample(fit_points_per_cluster)
    if fit_points is not x:
        centroids, *_, it = lloyd(fit_points, centroids, iters, tol, chunk_size)
        logger.debug("subsample phase: %d iterations", it)
    centroids, index, sqdist, it = lloyd(x, centroids, iters, tol, chunk_size)
    logger.debug("k-means k=%d N=%d: %d full iterations, inertia %.6g", k, n, it, sqdist.sum().item())
    return centroids, index
