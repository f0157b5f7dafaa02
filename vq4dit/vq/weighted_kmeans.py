"""Output-aware codebooks: k-means weighted by a Linear's input second moments (docs/method.md "Output-aware start",
issue 19a).

A Linear y = W x with inputs x has expected output error E||(W - W_hat) x||^2 = trace(dW H dW^T), H = E[x x^T].
Sub-vector i of W.reshape(-1, d) (row r, input columns [j*d, (j+1)*d), j = i % (in/d)) sees the d x d diagonal
block H_j of H; dropping the cross-block terms, the error is sum_i (w_i - c_a(i))^T H_j(i) (w_i - c_a(i)), which
weighted_kmeans minimises (plain k-means is H_j = I). gptvq_assign adds GPTQ-style error feedback across the
column groups with the full H. Pure functions of tensors on the device of the weight; no model is known here.

Distances use the expansion w^T H w - 2 (H w)^T c + c^T H c: H_j w_i (N, d) and w_i^T H_j w_i (N,) are computed
once (points never move), c^T H_j c is a (G, k) table per iteration, so one chunk of the assignment is an addmm
plus a gather of that table, whatever groups the chunk's points belong to.
"""
import logging
import math

import torch

from vq4dit.utils.errors import UserError
from vq4dit.vq.kmeans import kmeans
from vq4dit.vq.nearest import DEFAULT_CHUNK

logger = logging.getLogger(__name__)

WEIGHTED_INITS = ("kmeans", "kmeans++")


class InputMoments:
    """Running sums of x x^T over a Linear's inputs, fed in chunks: the d x d diagonal blocks (unless dim is None),
    and the full n x n matrix when full=True (for gptvq_assign; diagonal_blocks cuts it for any d). Each chunk's
    products are summed in the input's float32 (a GPU runs float64 matmuls at a small fraction of that rate, and a
    CPU at half, with twice the memory: DiT-XL/2's fc2 chunk is 2.25 GiB in float64), the running sums in float64 on
    `device`: one fp32 sum over all of ~1e6 chunks' products would lose digits, one chunk's (~1e5 terms) keeps ~5."""

    def __init__(self, n, dim, full=False, device="cpu"):
        if dim is not None and n % dim:
            raise UserError(f"input width {n} is not a multiple of dim={dim}")
        self.n, self.dim, self.count, self.device = n, dim, 0, device
        self.block_sums = None if dim is None else torch.zeros(n // dim, dim, dim, dtype=torch.float64,
                                                               device=device)  # (G, d, d)
        self.full_sum = torch.zeros(n, n, dtype=torch.float64, device=device) if full else None  # (n, n)

    def add(self, x):
        """x (..., n): any leading shape, e.g. (B, T, n) token activations or (B, n)."""
        x = x.detach().reshape(-1, self.n).float()  # (M, n) on its own device
        if self.block_sums is not None:
            xb = x.reshape(x.shape[0], -1, self.dim)  # (M, G, d)
            self.block_sums += torch.einsum("mgi,mgj->gij", xb, xb).to(self.device, torch.float64)
        if self.full_sum is not None:
            self.full_sum += (x.t() @ x).to(self.device, torch.float64)
        self.count += x.shape[0]

    def blocks(self):
        """(G, d, d) float64: the diagonal blocks of E[x x^T]."""
        if self.block_sums is None:
            return diagonal_blocks(self.full(), self.dim)
        return self.block_sums / max(self.count, 1)

    def full(self):
        """(n, n) float64: E[x x^T] (requires full=True)."""
        if self.full_sum is None:
            raise ValueError("InputMoments was built with full=False")
        return self.full_sum / max(self.count, 1)


def input_moments(x, dim):
    """x (M, n) inputs of a Linear -> (n/dim, dim, dim) float64: the dim x dim diagonal blocks of E[x x^T]."""
    acc = InputMoments(x.shape[-1], dim)
    acc.add(x)
    return acc.blocks()


def diagonal_blocks(h_full, dim):
    """h_full (n, n) -> (n/dim, dim, dim): its dim x dim diagonal blocks (one full H serves every dim)."""
    g = h_full.shape[0] // dim
    return h_full.reshape(g, dim, g, dim).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


class WeightedPoints:
    """Sub-vectors with their metrics: p (M, d) points, group (M,) int64 column group j, h (G, d, d) the blocks,
    hp (M, d) = H_j p (precomputed once: points never move); php (M,) = p^T H_j p."""

    def __init__(self, p, group, h, hp):
        self.p, self.group, self.h, self.hp = p, group, h, hp
        self.php = (hp * p).sum(1)  # (M,)

    def subset(self, rows):
        return WeightedPoints(self.p[rows], self.group[rows], self.h, self.hp[rows])

    def centroid_norms(self, centroids):
        """(G, k): c^T H_j c of every centroid (k, d) under every group's metric."""
        return torch.einsum("kd,gde,ke->gk", centroids, self.h, centroids)

    def distances(self, centroids, rows=slice(None), chc=None):
        """(c, k) weighted squared distances of points[rows] to centroids (k, d), as p^T H p - 2 (H p)^T c + c^T H c
        (chc: centroid_norms(centroids), when the caller reuses it across chunks)."""
        chc = self.centroid_norms(centroids) if chc is None else chc
        return torch.addmm(chc[self.group[rows]], self.hp[rows], centroids.t(), alpha=-2.0) + self.php[rows, None]


def weighted_assign(points, centroids, chunk_size=DEFAULT_CHUNK):
    """Nearest centroid of every point under its own metric -> (index (M,) int64, sqdist (M,)); chunked so one
    (chunk, k) block of distances is in memory at a time."""
    m = points.p.shape[0]
    index = torch.empty(m, dtype=torch.int64, device=points.p.device)
    sqdist = torch.empty(m, dtype=points.p.dtype, device=points.p.device)
    chc = points.centroid_norms(centroids)  # (G, k)
    for s in range(0, m, chunk_size):
        rows = slice(s, min(s + chunk_size, m))
        best, index[rows] = points.distances(centroids, rows, chc).min(1)  # (c,), (c,)
        sqdist[rows] = best.clamp_min_(0)  # cancellation can dip below zero
    return index, sqdist


def weighted_update(points, index, centroids, damp=1e-6):
    """Weighted centroids: c_a = (sum_i H_j(i))^-1 sum_i H_j(i) p_i over the points of cluster a, the minimiser of
    the cluster's weighted error. Sums in float64. A singular sum (e.g. a dead input column) is damped by
    damp * mean(diag) towards the cluster's plain mean, so an unconstrained direction takes the plain mean.
    -> (centroids (k, d), empty cluster ids)."""
    k, d = centroids.shape
    groups = points.h.shape[0]
    counts = torch.bincount(index * groups + points.group, minlength=k * groups).reshape(k, groups)  # (k, G)
    a = (counts.double() @ points.h.reshape(groups, d * d).double()).reshape(k, d, d)  # (k, d, d) sum of H_j
    b = torch.zeros(k, d, dtype=torch.float64, device=index.device).index_add_(0, index, points.hp.double())  # (k, d)
    sizes = counts.sum(1)  # (k,)
    filled = sizes > 0
    means = torch.zeros(k, d, dtype=torch.float64, device=index.device).index_add_(0, index, points.p.double())
    means[filled] /= sizes[filled, None]
    lam = damp * a.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # (k,)
    eye = torch.eye(d, dtype=torch.float64, device=index.device)
    new = centroids.clone()
    sol = torch.linalg.solve(a[filled] + lam[filled, None, None] * eye, b[filled] + lam[filled, None] * means[filled])
    new[filled] = sol.to(centroids.dtype)
    return new, (~filled).nonzero().flatten()


def weighted_lloyd(points, centroids, iters, tol=1e-4, chunk_size=DEFAULT_CHUNK):
    """Lloyd iterations under the weighted distance -> (centroids (k, d), index (M,), iterations run). Empty
    clusters are re-seeded with the points of largest weighted error (as vq.kmeans.lloyd does with plain error).
    Stops once fewer than `tol` of the points change cluster."""
    index, sqdist = weighted_assign(points, centroids, chunk_size)
    done = 0
    for done in range(1, iters + 1):
        centroids, empty = weighted_update(points, index, centroids)
        if len(empty):
            far = sqdist.topk(len(empty)).indices  # (E,) distinct worst-represented points
            centroids[empty] = points.p[far]
            logger.debug("re-seeded %d empty clusters", len(empty))
        new_index, sqdist = weighted_assign(points, centroids, chunk_size)
        changed = (new_index != index).sum().item()
        index = new_index
        if changed < tol * len(index) and not len(empty):
            break
    return centroids, index, done


def weighted_kmeans_plusplus(points, k, generator, trials=None):
    """Greedy k-means++ seeding under the weighted distance -> centroids (k, d); as vq.kmeans.kmeans_plusplus."""
    m = points.p.shape[0]
    trials = trials or 2 + int(math.log(k))
    centroids = torch.empty(k, points.p.shape[1], dtype=points.p.dtype, device=points.p.device)
    centroids[0] = points.p[torch.randint(m, (1,), generator=generator, device=points.p.device)[0]]
    closest = points.distances(centroids[:1]).flatten().clamp_min_(0)  # (M,)
    for j in range(1, k):
        if closest.sum() <= 0:
            picks = torch.randint(m, (trials,), generator=generator, device=points.p.device)
        else:
            picks = torch.multinomial(closest, trials, replacement=True, generator=generator)  # (trials,)
        cand = points.p[picks]  # (trials, d)
        pot = torch.minimum(points.distances(cand).t().clamp_min_(0), closest)  # (trials, M)
        best = pot.sum(1).argmin()
        centroids[j], closest = cand[best], pot[best]
    return centroids


def weight_points(w, h_blocks, dim):
    """w (out, in), h_blocks (in/dim, dim, dim) -> WeightedPoints over W.reshape(-1, dim) (N = out * in / dim)."""
    out, n = w.shape
    if n % dim or tuple(h_blocks.shape) != (n // dim, dim, dim):
        raise UserError(f"weighted k-means: weight {tuple(w.shape)} with dim={dim} needs h_blocks of shape "
                        f"({n // dim}, {dim}, {dim}) and in % dim == 0, got {tuple(h_blocks.shape)}")
    p = w.detach().float().reshape(-1, dim)  # (N, d)
    h = h_blocks.to(p.device, torch.float32)  # (G, d, d)
    hp = torch.einsum("gij,rgj->rgi", h, p.reshape(out, -1, dim)).reshape(-1, dim)  # (N, d); H symmetric
    group = torch.arange(n // dim, device=p.device).repeat(out)  # (N,): sub-vector i sees H_{i % G}
    return WeightedPoints(p, group, h, hp)


def weighted_kmeans(w, h_blocks, k, dim, iters=20, seed=0, init="kmeans", kmeans_iters=100, tol=1e-4,
                    fit_points_per_cluster=512, start=None):
    """Output-aware codebook of w (out, in) for inputs with diagonal blocks h_blocks (in/dim, dim, dim) of E[x x^T]
    -> (codebook (k, dim) float32, assignments (N,) int64 over W.reshape(-1, dim)).

    init "kmeans" (default): the plain vq.kmeans.kmeans codebook (kmeans_iters, seed), then weighted Lloyd.
    init "kmeans++": greedy weighted k-means++ seeding on 64 * k random points, then weighted Lloyd.
    Weighted Lloyd runs up to `iters` iterations on 512 * k random points (fit_points_per_cluster; None: all),
    then up to max(2, iters // 4) on all points (as vq.kmeans does: most of the gain of all points comes in the
    first passes). Each phase stops once fewer than `tol` of its points change cluster. Deterministic for a seed.
    start (k, dim): initial centroids instead of `init` (e.g. the plain codebook a layer already holds).
    """
    if init not in WEIGHTED_INITS:
        raise UserError(f"invalid weighted k-means init={init!r}: choose one of {', '.join(WEIGHTED_INITS)}")
    points = weight_points(w, h_blocks, dim)
    n = points.p.shape[0]
    if n < k:
        raise UserError(f"weighted k-means with k={k} needs at least k sub-vectors, got {n}")
    g = torch.Generator(device=points.p.device).manual_seed(seed)

    def sample(per_cluster):
        if per_cluster is None or per_cluster * k >= n:
            return points
        return points.subset(torch.randperm(n, generator=g, device=points.p.device)[:per_cluster * k])

    if start is not None:
        centroids = start.detach().float().to(points.p.device).clone()
    elif init == "kmeans":
        centroids, _ = kmeans(points.p, k, iters=kmeans_iters, seed=seed)
    else:
        centroids = weighted_kmeans_plusplus(sample(64), k, g)
    fit = sample(fit_points_per_cluster)
    if fit is not points:
        centroids, _, it = weighted_lloyd(fit, centroids, iters, tol)
        logger.debug("weighted k-means subsample phase: %d iterations", it)
        iters = max(2, iters // 4)
    centroids, index, it = weighted_lloyd(points, centroids, iters, tol)
    logger.debug("weighted k-means k=%d N=%d: %d iterations on all points", k, n, it)
    return centroids, index


def weighted_nearest_codewords(w, h_blocks, codebook, dim, n, chunk_size=DEFAULT_CHUNK):
    """The n nearest codewords of every sub-vector of w (out, in) under its weighted distance, closest first: the
    candidate sets of a soft layer whose codebook came from weighted_kmeans (vq.candidates.nearest_codewords is the
    plain-distance counterpart). -> (index (N, n) int64, distance (N, n) = sqrt((w - c)^T H_j (w - c)))."""
    points = weight_points(w, h_blocks, dim)
    codebook = codebook.float()
    m = points.p.shape[0]
    index = torch.empty(m, n, dtype=torch.int64, device=points.p.device)
    dist = torch.empty(m, n, dtype=points.p.dtype, device=points.p.device)
    chc = points.centroid_norms(codebook)  # (G, k)
    for s in range(0, m, chunk_size):
        rows = slice(s, min(s + chunk_size, m))
        d_n, index[rows] = points.distances(codebook, rows, chc).topk(n, dim=1, largest=False, sorted=True)  # (c, n)
        dist[rows] = d_n.clamp_min_(0).sqrt_()
    return index, dist


def weighted_error(w, h_blocks, codebook, index, dim):
    """sum_i (w_i - c_a(i))^T H_j(i) (w_i - c_a(i)): the block-diagonal output error of a quantization (float64)."""
    diff = (w.detach().double().reshape(-1, dim) - codebook.double()[index]).reshape(w.shape[0], -1, dim)  # (out,G,d)
    return torch.einsum("rgi,gij,rgj->", diff, h_blocks.double(), diff).item()


def inverse_cholesky(h_full, damp=0.01):
    """U (n, n) upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1, float64 (GPTQ's factor). A column
    no input reaches (zero diagonal) gets a unit diagonal, as GPTQ does, so H stays invertible."""
    h = h_full.double().clone()  # (n, n)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptvq_assign(w, h_full, codebook, dim, damp=0.01, block=128):
    """Assignments of w (out, in) to a fixed codebook (k, dim) with GPTQ / GPTVQ error feedback (docs/method.md
    "Output-aware start")
    -> (N,) int64 over W.reshape(-1, dim). A codebook (S, k, dim) holds S residual stages (vq/residual.py): each
    column group takes stage 1's codeword, then stage 2's for what stage 1 leaves, and so on, and the error fed
    back is what all stages leave -> (S, N).

    Column groups of `dim` inputs are quantized left to right; a group's quantization error is spread onto the
    columns not yet quantized so that the layer output error under the full H (in, in) is what is minimised, not
    the weight error. With U the upper Cholesky factor of H^-1 (inverse_cholesky), group g is assigned under the
    metric ||(w - c) U_gg^-1||^2 (the output error left after the later columns compensate) and the later columns
    move by -(w - c) U_gg^-1 U_g,later. Updates beyond the current `block` columns are applied once per block
    (GPTQ's lazy batching: the same result, less memory traffic)."""
    out, n = w.shape
    if n % dim or block % dim:
        raise UserError(f"gptvq_assign: in={n} and block={block} must be multiples of dim={dim}")
    u = inverse_cholesky(h_full, damp).to(w.device)  # (n, n)
    work = w.detach().double().clone()  # (out, n): the weight with the feedback received so far
    stages = codebook.double().reshape(-1, *codebook.shape[-2:])  # (S, k, d)
    index = torch.empty(len(stages), out, n // dim, dtype=torch.int64, device=w.device)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        errs = torch.empty(out, b1 - b0, dtype=torch.float64, device=w.device)  # (out, B): scaled errors of the block
        for s in range(b0, b1, dim):
            g = slice(s, s + dim)
            u_inv = torch.linalg.inv(u[g, g])  # (d, d)
            left = work[:, g]  # (out, d): what the stages so far leave
            for j, cb in enumerate(stages):
                dist = torch.cdist(left @ u_inv, cb @ u_inv)  # (out, k)
                index[j, :, s // dim] = dist.argmin(1)
                left = left - cb[index[j, :, s // dim]]
            err = left @ u_inv  # (out, d)
            errs[:, s - b0:s - b0 + dim] = err
            work[:, s + dim:b1] -= err @ u[g, s + dim:b1]
        work[:, b1:] -= errs @ u[b0:b1, b1:]
    return index.reshape(-1) if codebook.dim() == 2 else index.reshape(len(stages), -1)


def refit_codebook(w, h_full, codebook, index, dim, steps=10):
    """The codebook (k, dim) minimising the full output error tr((W - W_hat) H (W - W_hat)^T) for fixed assignments
    index (N,), W_hat = codebook[index].reshape(W.shape): conjugate gradient on this quadratic in the codebook,
    `steps` iterations from `codebook` (exact line search). Each step costs one (out, in) x (in, in) product, in
    float32 (DiT-XL/2's fc2: 49 GFLOP); the CG scalars and the codebook stay float64."""
    out, n = w.shape
    h = h_full.to(w.device, torch.float32)  # (n, n)
    k = codebook.shape[0]
    c = codebook.double().clone()  # (k, d)

    def expand(cb):
        return cb.float()[index].reshape(out, n)  # (out, n)

    def gather(grad_w):  # d/dC of a function of W_hat, given its gradient (out, n)
        grad = grad_w.reshape(-1, dim).double()  # (N, d)
        return torch.zeros(k, dim, dtype=torch.float64, device=w.device).index_add_(0, index, grad)

    residual = -gather((expand(c) - w.float()) @ h)  # (k, d): minus half the gradient
    direction = residual.clone()
    for _ in range(steps):
        dh = expand(direction)  # (out, n)
        dhh = dh @ h  # (out, n): the one big product of the step
        curvature = (dhh.double() * dh.double()).sum()
        if curvature <= 0:
            break
        step = (residual * residual).sum() / curvature
        c += step * direction
        new_residual = residual - step * gather(dhh)
        beta = (new_residual * new_residual).sum() / (residual * residual).sum().clamp_min(1e-300)
        residual, direction = new_residual, new_residual + beta * direction
    return c.to(codebook.dtype)


def gptvq(w, h_full, k, dim, seed=0, refit_steps=10, damp=0.01, start=None):
    """The whole output-aware start in one call: weighted_kmeans on the diagonal blocks of h_full (in, in) (from the
    codebook `start` (k, dim) when given), then gptvq_assign (error feedback) and refit_codebook
    -> (codebook (k, dim), assignments (N,) over W.reshape(-1, d))."""
    codebook, _ = weighted_kmeans(w, diagonal_blocks(h_full, dim), k, dim, seed=seed, start=start)
    index = gptvq_assign(w, h_full, codebook, dim, damp)
    return refit_codebook(w, h_full, codebook, index, dim, refit_steps), index
