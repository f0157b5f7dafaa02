"""Output-aware (input-weighted) k-means against slow, obviously correct references: per-point distance loops,
per-cluster closed-form minimisers, the plain k-means it must reduce to with H = I, and the layer output error it
exists to lower."""
import pytest
import torch

from vq4dit.utils.errors import UserError
from vq4dit.vq.kmeans import kmeans
from vq4dit.vq.weighted_kmeans import (
    InputMoments,
    diagonal_blocks,
    gptvq,
    gptvq_assign,
    input_moments,
    refit_codebook,
    weight_points,
    weighted_assign,
    weighted_error,
    weighted_kmeans,
    weighted_kmeans_plusplus,
    weighted_lloyd,
    weighted_nearest_codewords,
    weighted_update,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spd_blocks(groups, d, seed):
    """(G, d, d) random symmetric positive definite blocks of very different scales and shapes."""
    a = torch.randn(groups, d, d, generator=gen(seed))
    scale = torch.exp(2 * torch.randn(groups, 1, 1, generator=gen(seed + 1)))
    return (a @ a.transpose(1, 2) + 0.1 * torch.eye(d)) * scale


def test_moments_accumulate_over_chunks_like_the_full_second_moment():
    """Catches a block taken from the wrong columns, a missing division by the row count, or a chunk dropped."""
    x = torch.randn(3, 10, 12, generator=gen(0)) * torch.arange(1, 13)  # (B, T, n)
    acc = InputMoments(12, 4, full=True)
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 12).double()
    full = flat.t() @ flat / flat.shape[0]  # (n, n)
    blocks = torch.stack([full[j * 4:(j + 1) * 4, j * 4:(j + 1) * 4] for j in range(3)])
    assert torch.allclose(acc.full(), full)
    assert torch.allclose(acc.blocks(), blocks)
    assert torch.allclose(input_moments(flat, 4), blocks)
    assert torch.equal(diagonal_blocks(full, 4), blocks)


def test_assignment_equals_a_per_point_loop():
    """Sub-vector i of W.reshape(-1, d) uses H_{i % (in/d)}; the candidate sets are its 3 nearest under the same
    distance. Catches a wrong group index (e.g. i // out), a missing c^T H c term, or a transposed metric."""
    out, n, d, k = 5, 12, 3, 7
    w = torch.randn(out, n, generator=gen(1))
    h = spd_blocks(n // d, d, 2)
    codebook = torch.randn(k, d, generator=gen(4))
    points = weight_points(w, h, d)
    index, sqdist = weighted_assign(points, codebook, chunk_size=4)  # chunks cross row boundaries
    cand, cand_dist = weighted_nearest_codewords(w, h, codebook, d, 3, chunk_size=4)
    subs = w.reshape(-1, d)
    for i in range(subs.shape[0]):
        hj = h[i % (n // d)]
        dist = torch.stack([(subs[i] - c) @ hj @ (subs[i] - c) for c in codebook])  # (k,)
        assert index[i] == dist.argmin()
        assert torch.isclose(sqdist[i], dist.min(), rtol=1e-4, atol=1e-4)
        assert torch.equal(cand[i], dist.argsort()[:3])  # the 3 weighted-nearest, closest first
        assert torch.allclose(cand_dist[i], dist.sort().values[:3].sqrt(), rtol=1e-4, atol=1e-4)


def test_update_is_the_per_cluster_minimiser():
    """c_a = (sum H)^-1 sum H w: the gradient sum_i H_j(i) (c_a - w_i) of every cluster's error vanishes, and the
    update matches a per-cluster solve. Catches plain means (H ignored) or a per-point H from the wrong group."""
    out, n, d, k = 8, 16, 4, 5
    w = torch.randn(out, n, generator=gen(5))
    h = spd_blocks(n // d, d, 6)
    points = weight_points(w, h, d)
    index = torch.randint(k, (points.p.shape[0],), generator=gen(7))
    index[:k] = torch.arange(k)  # no empty cluster
    new, empty = weighted_update(points, index, torch.zeros(k, d))
    assert len(empty) == 0
    subs = w.reshape(-1, d).double()
    for a in range(k):
        members = (index == a).nonzero().flatten().tolist()
        hs = [h[i % (n // d)].double() for i in members]
        ref = torch.linalg.solve(sum(hs), sum(hj @ subs[i] for hj, i in zip(hs, members)))
        grad = sum(hj @ (new[a].double() - subs[i]) for hj, i in zip(hs, members))
        assert torch.allclose(new[a].double(), ref, atol=1e-4)
        assert grad.abs().max() < 1e-3 * max(hj.abs().max() for hj in hs)


def anisotropic_problem(seed):
    """A 64 x 32 weight and inputs whose 4 large-variance columns (std 10) dominate the output; the inputs are
    correlated within each d=4 group, so the metric is not diagonal either."""
    g = gen(seed)
    w = torch.randn(64, 32, generator=g)
    scale = torch.ones(32)
    scale[[1, 6, 13, 27]] = 10.0

    def inputs(m, s):
        z = torch.randn(m, 32, generator=gen(s))
        mix = z.reshape(m, 8, 4) + 0.5 * z.reshape(m, 8, 4).sum(-1, keepdim=True)
        return mix.reshape(m, 32) * scale  # (M, 32)

    return w, inputs(2000, seed + 100), inputs(2000, seed + 200)


def output_error(w, codebook, index, x):
    w_hat = codebook[index].reshape(w.shape)
    return (((w - w_hat) @ x.t()) ** 2).sum().item() / ((w @ x.t()) ** 2).sum().item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("init", ["kmeans", "kmeans++"])
def test_weighted_beats_plain_kmeans_on_held_out_output_error(seed, init):
    """The point of the method: on held-out inputs, the layer's relative output error ||(W - W_hat) x||^2 is at most
    0.25x plain k-means' (measured 0.10x-0.13x on seeds 0-3, both inits). Catches H replaced by identity (1.0x)."""
    w, x_fit, x_test = anisotropic_problem(seed)
    k, d = 16, 4
    plain_c, plain_a = kmeans(w.reshape(-1, d), k, seed=seed)
    c, a = weighted_kmeans(w, input_moments(x_fit, d), k, d, seed=seed, init=init)
    assert output_error(w, c, a, x_test) <= 0.25 * output_error(w, plain_c, plain_a, x_test)


def test_identity_metric_reduces_to_plain_kmeans():
    """H = I: the weighted objective is plain k-means inertia, and starting from the plain k-means fixed point
    weighted Lloyd stays there (same objective within 0.1%). Catches a metric or update that is off even for I."""
    w = torch.randn(96, 16, generator=gen(8))
    k, d = 16, 4
    h = torch.eye(d).expand(16 // d, d, d)
    plain_c, plain_a = kmeans(w.reshape(-1, d), k, iters=300, seed=3, tol=0.0)
    inertia = ((w.reshape(-1, d) - plain_c[plain_a]) ** 2).sum().item()
    assert weighted_error(w, h, plain_c, plain_a, d) == pytest.approx(inertia, rel=1e-5)
    c, a = weighted_kmeans(w, h, k, d, seed=3, kmeans_iters=300)
    assert weighted_error(w, h, c, a, d) == pytest.approx(inertia, rel=1e-3)
    points = weight_points(w, h, d)
    index, _ = weighted_assign(points, plain_c)
    assert torch.equal(index, plain_a)


def test_deterministic_for_a_seed_and_reseeds_empty_clusters():
    """Same seed, same result; a cluster left empty by its start is re-seeded (every codeword used)."""
    w, x_fit, _ = anisotropic_problem(2)
    h = input_moments(x_fit, 4)
    c1, a1 = weighted_kmeans(w, h, 16, 4, seed=4, init="kmeans++")
    c2, a2 = weighted_kmeans(w, h, 16, 4, seed=4, init="kmeans++")
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    points = weight_points(w, h, 4)
    start = torch.cat([points.p[:15], torch.full((1, 4), 1e3)])  # codeword 15 far from every point
    _, index, _ = weighted_lloyd(points, start, iters=20)
    assert (torch.bincount(index, minlength=16) > 0).all()


def test_bad_shapes_fail_clearly():
    w = torch.randn(8, 12)
    with pytest.raises(UserError, match="h_blocks"):
        weighted_kmeans(w, torch.eye(4).expand(2, 4, 4), 4, 4)
    with pytest.raises(UserError, match="init"):
        weighted_kmeans(w, torch.eye(4).expand(3, 4, 4), 4, 4, init="bogus")


def damped(h, damp=0.01):
    return h.double() + damp * h.double().diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)


def obs_reference(w, h, codebook, dim):
    """GPTQ's optimal-brain-surgeon step written out with explicit inverses: group g is assigned under the metric
    ((H_FF^-1)_gg)^-1 over the not-yet-quantized columns F, and the later columns move by
    -e ((H_FF^-1)_gg)^-1 (H_FF^-1)_g,later."""
    work, hd, cb = w.double().clone(), damped(h), codebook.double()
    index = []
    for s in range(0, w.shape[1], dim):
        hinv = torch.linalg.inv(hd[s:, s:])  # (|F|, |F|)
        metric = torch.linalg.inv(hinv[:dim, :dim])  # (d, d)
        diff = work[:, None, s:s + dim] - cb[None]  # (out, k, d)
        a = torch.einsum("rki,ij,rkj->rk", diff, metric, diff).argmin(1)  # (out,)
        e = work[:, s:s + dim] - cb[a]  # (out, d)
        work[:, s + dim:] -= e @ metric @ hinv[:dim, dim:]
        index.append(a)
    return torch.stack(index, 1).reshape(-1)


def test_error_feedback_equals_the_explicit_obs_steps():
    """Catches a wrong factor (U instead of U^-1 in the metric), feedback sent to the wrong columns, or a lazy
    block update that misses columns (block=8 spans several groups and leaves a remainder)."""
    w, x_fit, _ = anisotropic_problem(3)
    h = x_fit.double().t() @ x_fit.double() / x_fit.shape[0]  # (32, 32)
    codebook = torch.randn(16, 4, generator=gen(9)) * 3
    ref = obs_reference(w, h, codebook, 4)
    assert torch.equal(gptvq_assign(w, h, codebook, 4, block=8), ref)
    assert torch.equal(gptvq_assign(w, h, codebook, 4, block=12), ref)


def residual_obs_reference(w, h, codebooks, dim):
    """obs_reference with S residual stages (S, k, d): group g takes stage 1's codeword under the metric, then stage
    2's for what stage 1 leaves, ...; the error spread onto the later columns is what all stages leave."""
    work, hd = w.double().clone(), damped(h)
    index = []
    for s in range(0, w.shape[1], dim):
        hinv = torch.linalg.inv(hd[s:, s:])  # (|F|, |F|)
        metric = torch.linalg.inv(hinv[:dim, :dim])  # (d, d)
        e, picks = work[:, s:s + dim].clone(), []
        for cb in codebooks.double():
            diff = e[:, None] - cb[None]  # (out, k, d)
            picks.append(torch.einsum("rki,ij,rkj->rk", diff, metric, diff).argmin(1))  # (out,)
            e = e - cb[picks[-1]]
        work[:, s + dim:] -= e @ metric @ hinv[:dim, dim:]
        index.append(torch.stack(picks))  # (S, out)
    return torch.stack(index, 2).reshape(len(codebooks), -1)


def test_residual_stages_error_feedback_equals_the_explicit_obs_steps():
    """gptvq_assign with a (S, k, d) codebook (vq/residual.py's output-aware fit) against the written-out steps, and
    a (1, k, d) codebook gives the (k, d) codebook's assignments (mutation: feedback of stage 1's error only, not of
    what both stages leave -> fails)."""
    w, x_fit, _ = anisotropic_problem(3)
    h = x_fit.double().t() @ x_fit.double() / x_fit.shape[0]  # (32, 32)
    stages = torch.stack([torch.randn(16, 4, generator=gen(9)) * 3, torch.randn(16, 4, generator=gen(10))])
    assert torch.equal(gptvq_assign(w, h, stages, 4, block=12), residual_obs_reference(w, h, stages, 4))
    assert torch.equal(gptvq_assign(w, h, stages[:1], 4, block=8)[0], gptvq_assign(w, h, stages[0], 4, block=8))


def correlated_problem(seed):
    """The 64 x 32 weight of anisotropic_problem with inputs correlated across column groups (a rank-3 shared
    factor plus noise, 4 columns scaled by 10): what error feedback needs to have something to spread."""
    w, _, _ = anisotropic_problem(seed)
    scale = torch.ones(32)
    scale[[1, 6, 13, 27]] = 10.0
    mix = torch.randn(3, 32, generator=gen(77))

    def inputs(m, s):
        g = gen(s)
        return (0.5 * torch.randn(m, 32, generator=g) + torch.randn(m, 3, generator=g) @ mix) * scale  # (M, 32)

    return w, inputs(2000, seed + 100), inputs(2000, seed + 200)


@pytest.mark.parametrize("seed", [0, 1])
def test_error_feedback_and_refit_lower_the_held_out_output_error(seed):
    """Same weighted codebook: assignments with feedback give at most 0.7x the held-out output error of the nearest
    assignments (measured 0.41x-0.51x on seeds 0-3), and refitting the codebook under the full H lowers it further
    by at least 5% (measured 18-22%). Catches feedback switched off (1.0x) or a refit that does not move."""
    w, x_fit, x_test = correlated_problem(seed)
    h = x_fit.double().t() @ x_fit.double() / x_fit.shape[0]  # (32, 32)
    c, a = weighted_kmeans(w, diagonal_blocks(h, 4), 16, 4, seed=seed)  # the blocks gptvq() cuts from h
    fed = gptvq_assign(w, h, c, 4)
    assert output_error(w, c, fed, x_test) <= 0.7 * output_error(w, c, a, x_test)
    refit = refit_codebook(w, h, c, fed, 4)
    assert output_error(w, refit, fed, x_test) <= 0.95 * output_error(w, c, fed, x_test)
    whole_c, whole_a = gptvq(w, h, 16, 4, seed=seed)  # the one-call API is exactly these three steps
    assert torch.equal(whole_a, fed) and torch.equal(whole_c, refit)


def test_refit_solves_the_full_output_error_least_squares():
    """The refitted codebook equals the normal-equation solution sum_r P_r^T H P_r c = sum_r P_r^T H w_r built
    explicitly (P_r the one-hot map from codebook to row r). Catches a wrong step or a missing H."""
    out, n, d, k = 6, 8, 2, 5
    w = torch.randn(out, n, generator=gen(10))
    x = torch.randn(50, n, generator=gen(11)) * torch.arange(1, n + 1)
    h = (x.t() @ x / 50).double()
    index = torch.randint(k, (out * n // d,), generator=gen(12))
    c = refit_codebook(w, h, torch.zeros(k, d), index, d, steps=k * d)
    lhs, rhs = torch.zeros(k * d, k * d, dtype=torch.float64), torch.zeros(k * d, dtype=torch.float64)
    for r in range(out):
        p = torch.zeros(n, k * d, dtype=torch.float64)
        for j in range(n // d):
            a = index[r * (n // d) + j]
            p[j * d:(j + 1) * d, a * d:(a + 1) * d] = torch.eye(d)
        lhs += p.t() @ h @ p
        rhs += p.t() @ h @ w[r].double()
    ref = torch.linalg.lstsq(lhs, rhs).solution.reshape(k, d)
    used = torch.bincount(index, minlength=k) > 0
    assert torch.allclose(c.double()[used], ref[used], atol=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_weighted_seeding_finds_the_clusters_the_metric_sees(seed):
    """d=2 points in 4 tight clusters along coordinate 0 (weight 100) and spread +-10 along coordinate 1 (weight
    1e-3): weighted k-means++ seeds one centroid per cluster (10 of 10 seeds). Catches seeding under the plain
    distance, which spreads along coordinate 1 (all 4 clusters on 3 of 10 seeds)."""
    g = gen(seed)
    w = torch.stack([torch.randint(4, (400,), generator=g).float() + 0.01 * torch.randn(400, generator=g),
                     20 * torch.rand(400, generator=g) - 10], 1).reshape(8, 100)  # (8, 100): 400 points
    h = torch.diag(torch.tensor([100.0, 1e-3])).expand(50, 2, 2)
    c = weighted_kmeans_plusplus(weight_points(w, h, 2), 4, gen(seed))
    assert sorted(c[:, 0].round().abs().tolist()) == [0.0, 1.0, 2.0, 3.0]
