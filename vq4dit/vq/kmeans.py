"""k-means for codebook initialisation: greedy k-means++ seeding, chunked Lloyd iterations.

Pure functions of tensors; everything runs on the device of `x` (CPU or CUDA). Two initialisations (KMEANS_INITS):
"fast" (the default, below) and "authors" (the authors' code, docs/method.md "The authors' calibration"; see `kmeans`).

Speed levers of "fast" (see benchmarks/bench_kmeans.py):
- chunked distances with the nearest and second-nearest found by a min and a value-only min (vq/nearest.py);
- k-means++ seeding on a random subsample (its quality barely depends on N once N >> k);
- Hamerly's distance bounds, so each Lloyd step re-assigns only points that may have changed cluster;
- Lloyd on a subsample first, then a few refinement iterations on all points.
"""
import logging
import math

import torch

from vq4dit.utils.errors import UserError
from vq4dit.vq.nearest import DEFAULT_CHUNK, nearest_two

logger = logging.getLogger(__name__)

KMEANS_INITS = ("fast", "authors")


def authors_codebook_size(k, n):
    """The authors' clamp for small layers: min(k, the largest power of two <= n / 4), at least 1."""
    return min(k, 1 << (max(n // 4, 1).bit_length() - 1))


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


def _update(x64, index, k, centroids):
    """Means of the clusters (float64 sums, see lloyd); empty clusters keep their centroid. -> (centroids, empty)"""
    sums = torch.zeros(k, x64.shape[1], dtype=torch.float64, device=x64.device).index_add_(0, index, x64)  # (k, d)
    counts = torch.bincount(index, minlength=k)  # (k,)
    filled = counts > 0
    new = centroids.clone()
    new[filled] = (sums[filled] / counts[filled, None]).to(centroids.dtype)
    return new, (~filled).nonzero().flatten()


def lloyd(x, centroids, iters, tol=1e-4, chunk_size=DEFAULT_CHUNK, reseed=True):
    """Lloyd iterations from `centroids` (k, d) on x (N, d) -> (centroids, index (N,), iterations run).

    Exact Lloyd steps, accelerated with Hamerly's bounds: per point an upper bound on the distance to its centroid
    and a lower bound on the distance to any other; after centroids move by `shift`, only points whose bounds
    overlap are re-assigned, which late in the run is a small fraction. Stops once fewer than `tol` of the points
    change cluster (tol=0: never). Empty clusters are re-seeded with the points farthest from their centroid;
    with reseed=False (the authors' code) an empty cluster's centroid becomes the zero vector. Sums accumulate in
    float64 so that the (order-dependent) atomic adds on CUDA round to the same float32 centroids run after run.
    """
    k = centroids.shape[0]
    n = x.shape[0]
    index, sqdist, sqdist2 = nearest_two(x, centroids, chunk_size)
    upper, lower = sqdist.sqrt(), sqdist2.sqrt()  # (N,), (N,)
    x64 = x.double()
    done = 0
    for done in range(1, iters + 1):
        new, empty = _update(x64, index, k, centroids)
        if len(empty) and not reseed:
            new[empty] = 0
        elif len(empty):
            far = ((x - centroids[index]) ** 2).sum(1).topk(len(empty)).indices  # worst-represented points
            new[empty] = x[far]
            logger.debug("re-seeded %d empty clusters", len(empty))
        shift = (new - centroids).norm(dim=1)  # (k,)
        centroids = new
        upper += shift[index]
        if k > 1:  # the nearest other centroid moved at most the largest shift among the *other* centroids
            top = shift.topk(2)
            lower -= torch.where(index == top.indices[0], top.values[1], top.values[0])
        bound = lower
        if 1 < k <= 4096:  # a point closer than half the gap to its centroid's nearest neighbour cannot move
            gap = torch.cdist(centroids, centroids).fill_diagonal_(float("inf")).amin(1)  # (k,)
            bound = torch.maximum(lower, 0.5 * gap[index])
        maybe = (upper > bound).nonzero().flatten()
        upper[maybe] = (x[maybe] - centroids[index[maybe]]).norm(dim=1)  # tighten to the exact distance
        todo = maybe[upper[maybe] > bound[maybe]]
        new_index, sq, sq2 = nearest_two(x[todo], centroids, chunk_size)
        changed = (new_index != index[todo]).sum().item()
        index[todo], upper[todo], lower[todo] = new_index, sq.sqrt(), sq2.sqrt()
        logger.debug("lloyd iteration %d: %d of %d points re-assigned, %d changed", done, len(todo), n, changed)
        if changed < tol * n and not (reseed and len(empty)):
            break
    return centroids, index, done


def kmeans(x, k, iters=100, seed=0, tol=1e-4, chunk_size=DEFAULT_CHUNK, seed_points_per_cluster=64,
           fit_points_per_cluster=512, refine_iters=10, init="fast"):
    """k-means of x (N, d) into k clusters -> (codebook (k, d), assignments (N,) int64). Requires N >= k.

    init "authors" (docs/method.md "The authors' calibration"): k becomes authors_codebook_size(k, N) (the codebook
    has that many rows), greedy k-means++ seeding on all points, then exactly `iters` Lloyd iterations on all points
    with empty clusters collapsing to the zero vector (no early stop, no re-seeding); the other tuning arguments are
    unused.

    init "fast" (the default): greedy k-means++ seeding on at most `seed_points_per_cluster * k` random points.
    When N <= `fit_points_per_cluster * k` (or it is None), up to `iters` Lloyd iterations run on all points.
    Otherwise up to `iters` iterations run on that many random points, then up to `refine_iters` on all points:
    on weight-like data (a smooth density) Lloyd creeps for hundreds of iterations, and most of the inertia it
    still gains after a subsample fit comes in the first few full passes (bench_kmeans.py: DiT-XL/2 fc1 shape,
    within 0.6% of scikit-learn's 100 full iterations). Each phase stops early once fewer than `tol` of the
    points change cluster.

    Deterministic for a given seed and device.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects points of shape (N, d), got {tuple(x.shape)}")
    n = x.shape[0]
    if init not in KMEANS_INITS:
        raise UserError(f"invalid kmeans_init={init!r}: choose one of {', '.join(KMEANS_INITS)}")
    if init == "authors":
        k = authors_codebook_size(k, n)
    if k < 1 or n < k:
        raise UserError(f"k-means with k={k} needs at least k points, got {n}; use a smaller codebook_size "
                        f"or a smaller dim")
    x = x.float()  # float32 arithmetic throughout, also for half-precision inputs
    g = torch.Generator(device=x.device).manual_seed(seed)
    if init == "authors":
        centroids, index, _ = lloyd(x, kmeans_plusplus(x, k, g), iters, 0.0, chunk_size, reseed=False)
        return centroids, index

    def sample(per_cluster):
        if per_cluster is None or per_cluster * k >= n:
            return x
        return x[torch.randperm(n, generator=g, device=x.device)[:per_cluster * k]]

    centroids = kmeans_plusplus(sample(seed_points_per_cluster), k, g)
    fit_points = sample(fit_points_per_cluster)
    if fit_points is not x:
        centroids, _, it = lloyd(fit_points, centroids, iters, tol, chunk_size)
        logger.debug("subsample phase: %d iterations", it)
        iters = refine_iters
    centroids, index, it = lloyd(x, centroids, iters, tol, chunk_size)
    logger.debug("k-means k=%d N=%d: %d iterations on all points", k, n, it)
    return centroids, index
