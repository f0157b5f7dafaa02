"""Candidate sets, ratio init and reconstruction against loop references."""
import pytest
import torch

from vq4dit.utils.errors import UserError
from vq4dit.vq import CodebookSpec, VQLinear
from vq4dit.vq.candidates import (
    KEEP_ADVANTAGE,
    candidates_around,
    hard_reconstruct,
    init_logits,
    masked_ratios,
    nearest_codewords,
    soft_reconstruct,
    sum_into_rows,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_nearest_codewords_match_sorted_distances(n, chunk):
    x, cb = rand(40, 4), rand(16, 4, seed=1)
    index, dist = nearest_codewords(x, cb, n, chunk)
    ref = torch.cdist(x, cb)  # (N, k)
    ref_d, ref_i = ref.sort(1)
    assert torch.equal(index, ref_i[:, :n])
    assert torch.allclose(dist, ref_d[:, :n], atol=1e-5)


@pytest.mark.parametrize("n,groups", [(2, 1), (3, 3)])
def test_layer_candidates_are_the_n_nearest_codewords(n, groups):
    """VQLinear.from_linear keeps, for every sub-vector of the weight, the n codewords of its group's codebook
    nearest to it, closest first (brute force: torch.cdist + argsort); catches random or unsorted candidates."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 24)
    layer = VQLinear.from_linear(linear, CodebookSpec(16, 2, candidates=n, kmeans_iters=5), groups=groups)
    subs = linear.weight.detach().reshape(groups, -1, 2)  # (G, N/G, d)
    for g in range(groups):
        dist = torch.cdist(subs[g].double(), layer.codebook[g].detach().double())  # (N/G, k)
        ref = dist.argsort(1)[:, :n]  # (N/G, n)
        per_group = subs.shape[1]
        rows = slice(g * per_group, (g + 1) * per_group)
        assert torch.equal(layer.candidates[rows].long(), ref)
        # and the ratios start proportional to 1 / distance (the default ratio_init, the authors' code); absolute
        # tolerance: a sub-vector almost on a codeword has a float32 distance of rounding size
        inverse = 1 / (dist.gather(1, ref) + 1e-8)
        torch.testing.assert_close(layer.ratios()[rows].double(), inverse / inverse.sum(1, keepdim=True),
                                   rtol=0, atol=5e-3)


def test_candidates_out_of_range():
    with pytest.raises(UserError, match="candidates=5"):
        nearest_codewords(rand(3, 2), rand(4, 2), 5)


def test_inverse_distance_init_gives_ratios_proportional_to_inverse_distance():
    dist = torch.tensor([[1.0, 3.0], [0.5, 0.5], [2.0, 4.0]])
    r = torch.softmax(init_logits(dist, "inverse_distance"), 1)
    ref = (1 / dist) / (1 / dist).sum(1, keepdim=True)
    assert torch.allclose(r, ref, atol=1e-6)
    assert torch.equal(torch.softmax(init_logits(dist, "uniform"), 1), torch.full_like(dist, 0.5))
    assert torch.isfinite(init_logits(torch.zeros(1, 2))).all()
    with pytest.raises(UserError, match="ratio_init='bogus'"):
        init_logits(dist, "bogus")


def test_masked_ratios_one_hot_on_frozen_rows():
    logits = rand(6, 3)
    frozen = torch.tensor([True, False, True, False, False, False])
    r = masked_ratios(logits, frozen)
    soft = torch.softmax(logits, 1)
    for i in range(6):
        expect = torch.eye(3)[soft[i].argmax()] if frozen[i] else soft[i]
        assert torch.allclose(r[i], expect)


@pytest.mark.parametrize("groups", [1, 3])
def test_reconstruction_matches_loop(groups):
    k, d, n, per_group = 8, 2, 3, 5
    cb = rand(groups, k, d)
    cand = torch.randint(0, k, (groups * per_group, n), generator=torch.Generator().manual_seed(2))
    ratios = torch.softmax(rand(groups * per_group, n, seed=3), 1)
    soft, hard = soft_reconstruct(cb, cand, ratios), hard_reconstruct(cb, cand[:, 0])
    for i in range(groups * per_group):
        g = i // per_group
        assert torch.allclose(soft[i], sum(ratios[i, j] * cb[g, cand[i, j]] for j in range(n)), atol=1e-6)
        assert torch.equal(hard[i], cb[g, cand[i, 0]])


def slow_soft_weight(codebook, candidates, ratios):
    """sum_j r_j * C_g[cand_j] written out candidate by candidate (float64): one gather and product per j."""
    g, _, d = codebook.shape
    group = torch.arange(candidates.shape[0]) // (candidates.shape[0] // g)  # (N,)
    return sum(ratios[:, j, None] * codebook[group, candidates[:, j].long()] for j in range(candidates.shape[1]))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("d", [2, 4, 8])
def test_both_soft_weight_forms_match_the_slow_reference(groups, n, d):
    """The one-pass form (a GPU's default; its codebook gradient by index_add and by sorted sums) and einsum's (a
    CPU's) give the weight and the gradients of the codebook and of the ratios of the candidate-by-candidate
    float64 reference within 1e-6 (relative to the largest),
    with a group's codebook per block of rows (fused qkv) and one codebook (split qkv). Mutations: the backward's
    gather into the wrong group, the ratios' gradient summed over j instead of d, a candidate's r_j left out of
    the codebook gradient -> far off."""
    g = torch.Generator().manual_seed(groups * 100 + n * 10 + d)
    codebook = torch.randn(groups, 16, d, generator=g)
    candidates = torch.randint(0, 16, (groups * 500, n), dtype=torch.uint8, generator=g)
    logits, upstream = torch.randn(groups * 500, n, generator=g), torch.randn(groups * 500, d, generator=g)

    def weight_and_grads(fn, dtype):
        cb, lg = codebook.to(dtype, copy=True).requires_grad_(), logits.to(dtype, copy=True).requires_grad_()
        w = fn(cb, candidates, torch.softmax(lg, 1))
        (w * upstream.to(dtype)).sum().backward()
        return w.detach(), cb.grad, lg.grad

    reference = weight_and_grads(slow_soft_weight, torch.float64)
    for one_pass, method in ((True, "index_add"), (True, "sorted"), (False, "index_add")):
        got = weight_and_grads(lambda c, i, r: soft_reconstruct(c, i, r, one_pass, method), torch.float32)
        for name, a, b in zip(("weight", "codebook grad", "ratio grad"), got, reference):
            atol = 1e-6 * b.abs().max().item() + 1e-12  # n = 1: the ratios' gradient is 0
            torch.testing.assert_close(a.double(), b, rtol=0, atol=atol, msg=f"{name}, {one_pass}, {method}")


def test_sorted_sums_leave_unused_rows_zero_and_match_index_add():
    """sum_into_rows "sorted" against "index_add" on rows that skip some targets (their sums 0) and repeat others,
    int64 rows in any order. Mutations: the running sums' ends shifted by one row, float32 running sums (off by
    far more than 1e-6 at 200000 values) -> fail."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 40, (200000,), generator=g) * 2  # only the even rows of 80 are used
    values = torch.randn(200000, 3, generator=g) + 5.0  # a large running total: float32 sums would lose the rows
    fast = sum_into_rows(values, rows, 80, "sorted")
    reference = sum_into_rows(values.double(), rows, 80, "index_add")
    assert torch.equal(fast[1::2], torch.zeros(40, 3))
    torch.testing.assert_close(fast.double(), reference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("groups", [1, 3])
def test_codebook_gradient_is_bitwise_reproducible_with_two_threads(groups):
    """The calibration gradient of a codebook sums many sub-vectors' contributions; with 2 threads that sum
    must still come out in one order (advanced indexing's backward does not: a calibrated artifact differed
    run to run)."""
    torch.manual_seed(0)
    codebook = torch.randn(groups, 16, 4, requires_grad=True)
    candidates = torch.randint(0, 16, (groups * 60000, 2), dtype=torch.uint8)
    ratios = torch.softmax(torch.randn(groups * 60000, 2), 1)
    weight = torch.randn(groups * 60000, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(3):
            codebook.grad = None
            (soft_reconstruct(codebook, candidates, ratios) * weight).sum().backward()
            grads.append(codebook.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_candidates_around_keep_the_chosen_first_then_the_nearest_others(n):
    """Per-row loop reference: candidate 0 is the chosen codeword, then the n - 1 nearest codewords other than it,
    closest first; the chosen one's logit is the row's largest (its ratio 0.9 at n = 2), so an immediate hardening
    keeps it. Catches the chosen codeword duplicated among the others, or an even start with the nearest one."""
    x, cb = rand(30, 2), rand(8, 2, seed=1)
    chosen = torch.randint(8, (30,), generator=torch.Generator().manual_seed(2))
    index, dist = candidates_around(x, cb, chosen, n)
    for i in range(30):
        d = torch.cdist(x[i:i + 1], cb)[0]  # (k,)
        others = [j for j in d.argsort().tolist() if j != chosen[i]][:n - 1]
        assert index[i].tolist() == [chosen[i].item(), *others]
        assert torch.allclose(dist[i, 1:], d[others], atol=1e-6)
        assert torch.allclose(dist[i, 0], d[chosen[i]] if n == 1 else d[others].min() / KEEP_ADVANTAGE, atol=1e-6)
    assert torch.equal(init_logits(dist).argmax(1), torch.zeros(30, dtype=torch.int64))
    if n == 2:  # inverse-distance ratios start at 0.9 on the kept codeword
        assert torch.allclose(torch.softmax(init_logits(dist), 1)[:, 0], torch.full((30,), 0.9), atol=1e-5)
