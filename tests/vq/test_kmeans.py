"""k-means against brute-force references: nearest assignment, Lloyd fixed point, re-seeding, determinism."""
import pytest
import torch

from utils.errors import UserError
from vq.kmeans import kmeans, kmeans_plusplus, lloyd, nearest


def points(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def brute_nearest(x, c):
    sq = ((x[:, None, :] - c[None]) ** 2).sum(-1)  # (N, k)
    return sq.min(1)


@pytest.mark.parametrize("n,k,d,chunk", [(100, 7, 2, 16), (333, 32, 4, 1000), (50, 50, 3, 7)])
def test_nearest_matches_brute_force(n, k, d, chunk):
    x, c = points(n, d), points(k, d, seed=1)
    index, sqdist, sqdist2 = nearest(x, c, chunk)
    ref = ((x[:, None, :] - c[None]) ** 2).sum(-1).sort(1)  # (N, k) ascending
    assert torch.allclose(sqdist, ref.values[:, 0], atol=1e-5)
    assert torch.allclose(sqdist2, ref.values[:, 1], atol=1e-5)
    assert torch.equal(index, ref.indices[:, 0])


@pytest.mark.parametrize("n,k,d", [(600, 16, 2), (2000, 64, 4), (64, 64, 4), (50, 1, 3), (40, 2, 1)])
def test_kmeans_converges_to_a_lloyd_fixed_point(n, k, d):
    x = points(n, d)
    c, a = kmeans(x, k, iters=300, seed=3, tol=0.0)
    ref_d, ref_i = brute_nearest(x, c)
    assert torch.equal(a, ref_i)  # every point sits with its nearest centroid
    counts = torch.bincount(a, minlength=k)
    assert (counts > 0).all()  # no empty cluster survives
    means = torch.zeros(k, d).index_add_(0, a, x) / counts[:, None]
    assert torch.allclose(c, means, atol=1e-5)  # every centroid is the mean of its cluster


def test_kmeans_is_deterministic_and_seed_dependent():
    x = points(3000, 4)
    c1, a1 = kmeans(x, 32, iters=20, seed=5)
    c2, a2 = kmeans(x, 32, iters=20, seed=5)
    c3, _ = kmeans(x, 32, iters=20, seed=6)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    assert not torch.equal(c1, c3)


def test_subsampled_kmeans_close_to_full():
    x = points(20000, 4)
    c_sub, a_sub = kmeans(x, 32, iters=100, seed=0, seed_points_per_cluster=16, fit_points_per_cluster=64)
    c_full, a_full = kmeans(x, 32, iters=100, seed=0, seed_points_per_cluster=None, fit_points_per_cluster=None)
    inertia_sub = ((x - c_sub[a_sub]) ** 2).sum()
    inertia_full = ((x - c_full[a_full]) ** 2).sum()
    assert inertia_sub < 1.02 * inertia_full


def reference_lloyd(x, c, iters):
    """Plain Lloyd: assign by brute force, move every non-empty centroid to its cluster mean."""
    for _ in range(iters):
        a = brute_nearest(x, c)[1]
        c = torch.stack([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(len(c))])
    return c, brute_nearest(x, c)[1]


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_bounded_lloyd_matches_plain_lloyd(iters):
    x = points(3000, 3, seed=4)
    init = x[:24].clone()
    c, a, done = lloyd(x, init, iters, tol=0.0)
    ref_c, ref_a = reference_lloyd(x, init, iters)
    assert done == iters
    assert torch.allclose(c, ref_c, atol=1e-5)
    assert (a != ref_a).float().mean() < 1e-3  # only float near-ties may differ


def test_lloyd_reseeds_empty_clusters():
    x = points(500, 2)
    init = torch.cat([x[:7], torch.full((1, 2), 1e3)])  # centroid 7 is far from every point: empty at once
    c, a, _ = lloyd(x, init, iters=50)
    assert (torch.bincount(a, minlength=8) > 0).all()
    assert c[7].abs().max() < 100


def test_kmeans_plusplus_picks_distinct_points_and_handles_duplicates():
    g = torch.Generator().manual_seed(0)
    x = points(200, 3)
    c = kmeans_plusplus(x, 20, g)
    assert len(torch.unique(c, dim=0)) == 20
    assert all((x == row).all(1).any() for row in c)  # seeds are data points
    dup = torch.zeros(10, 3)  # fewer distinct points than k: still k (repeated) codewords, no crash
    c_dup, a_dup = kmeans(dup, 4, iters=5)
    assert c_dup.shape == (4, 3) and (c_dup == 0).all() and a_dup.shape == (10,)


def test_too_few_points_is_a_user_error():
    with pytest.raises(UserError, match="k=8 needs at least k points, got 5"):
        kmeans(points(5, 2), 8)
