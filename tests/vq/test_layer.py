"""VQLinear against slow per-sub-vector references; quantized layers' decode dtype and memory."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.vq.test_decode import random_vq
from vq4dit.utils.errors import UserError
from vq4dit.vq.candidates import hard_reconstruct
from vq4dit.vq.kernels.decode import release_workspace
from vq4dit.vq.kmeans import kmeans
from vq4dit.vq.layer import CodebookSpec, VQLinear
from vq4dit.vq.rtn import RTNLinear


def linear(in_f, out_f, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def reference_weight(layer):
    """Loop over sub-vectors: row-major, d consecutive inputs of one output row, group from the output row."""
    d, per_group = layer.dim, layer.out_features * layer.in_features // layer.dim // layer.groups
    subs = []
    for i in range(layer.out_features * layer.in_features // d):
        cb = layer.codebook[i // per_group]
        if layer.is_hard:
            subs.append(cb[int(layer.indices[i])])
        else:
            r = layer.ratios()[i]
            subs.append(sum(r[j] * cb[int(layer.candidates[i, j])] for j in range(layer.num_candidates)))
    return torch.stack(subs).reshape(layer.out_features, layer.in_features)


@pytest.mark.parametrize("groups,n,bias", [(1, 2, True), (3, 2, False), (1, 1, True), (3, 3, True)])
def test_weight_and_forward_match_reference(groups, n, bias):
    lin = linear(16, 24, bias)
    layer = VQLinear.from_linear(lin, CodebookSpec(8, 4, candidates=n, kmeans_iters=10), groups=groups)
    assert layer.codebook.shape == (groups, 8, 4) and layer.candidates.shape == (96, n)
    assert torch.allclose(layer.weight(), reference_weight(layer), atol=1e-6)
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), F.linear(x, layer.weight(), layer.bias), atol=1e-6)
    layer.harden()
    assert layer.is_hard and not hasattr(layer, "logits") and layer.indices.shape == (96,)
    assert torch.equal(layer.weight(), reference_weight(layer))


@pytest.mark.parametrize("k,dtype", [(8, torch.uint8), (512, torch.int16)])
def test_indices_are_kept_in_the_smallest_integer_dtype(k, dtype):
    layer = VQLinear.from_linear(linear(32, 64), CodebookSpec(k, 2, candidates=2, kmeans_iters=3))
    assert layer.candidates.dtype == dtype
    assert torch.allclose(layer.weight(), reference_weight(layer), atol=1e-6)
    layer.harden()
    assert layer.indices.dtype == dtype and int(layer.indices.max()) < k
    assert torch.equal(layer.weight(), reference_weight(layer))


def test_groups_have_their_own_kmeans_codebooks():
    lin = linear(8, 12)
    layer = VQLinear.from_linear(lin, CodebookSpec(4, 2, candidates=1, kmeans_iters=10), groups=3, seed=7)
    for g in range(3):
        rows = lin.weight.detach()[4 * g:4 * (g + 1)].reshape(-1, 2)
        cb, assign = kmeans(rows, 4, iters=10, seed=7 + g)
        assert torch.equal(layer.codebook[g], cb)
        assert torch.equal(layer.candidates[16 * g:16 * (g + 1), 0], assign)


def test_first_candidate_is_nearest_and_inverse_distance_init():
    lin = linear(16, 8)
    layer = VQLinear.from_linear(lin, CodebookSpec(16, 4, candidates=3, kmeans_iters=10))
    subs = lin.weight.detach().reshape(-1, 4)
    dist = torch.cdist(subs, layer.codebook[0])  # (N, k)
    chosen = dist.gather(1, layer.candidates.long())  # (N, 3)
    assert torch.equal(layer.candidates[:, 0], dist.argmin(1))
    r = layer.ratios()
    ref = (1 / (chosen + 1e-8)) / (1 / (chosen + 1e-8)).sum(1, keepdim=True)
    assert torch.allclose(r, ref, atol=1e-4)
    uniform = VQLinear.from_linear(lin, CodebookSpec(16, 4, candidates=3, kmeans_iters=10, ratio_init="uniform"))
    assert torch.allclose(uniform.ratios(), torch.full((32, 3), 1 / 3))


def test_freeze_harden_and_gradients():
    layer = VQLinear.from_linear(linear(8, 8), CodebookSpec(8, 2, candidates=2, kmeans_iters=5))
    with torch.no_grad():
        layer.logits.zero_()
        layer.logits[:10, 1] = 10.0  # confident: ratio ~ 1 - 4.5e-5
        layer.logits[10:12, 0] = 3.0  # ratio 0.95, below threshold
    layer.freeze_confident_(0.99)
    assert layer.selected_fraction() == pytest.approx(10 / 32) == layer.frozen_fraction().item()
    assert torch.equal(layer.ratios()[:10], torch.tensor([[0.0, 1.0]] * 10))
    layer(torch.randn(3, 8)).sum().backward()
    assert (layer.logits.grad[:10] == 0).all() and layer.logits.grad[12:].abs().sum() > 0
    assert layer.codebook.grad is not None and layer.bias.grad is not None
    expect = torch.where(layer.logits[:, 1] > layer.logits[:, 0], layer.candidates[:, 1], layer.candidates[:, 0])
    layer.harden()
    assert torch.equal(layer.indices, expect) and layer.selected_fraction() == 1.0


def test_round_codebook_and_bits():
    layer = VQLinear.from_linear(linear(64, 32), CodebookSpec(256, 4, kmeans_iters=2))
    layer.round_codebook_()
    assert torch.equal(layer.codebook, layer.codebook.half().float())
    assert layer.bits_per_weight() == 2.0
    assert layer.bits_per_weight(include_codebook=True) == pytest.approx(2.0 + 256 * 4 * 16 / (64 * 32))


@pytest.mark.parametrize("k,dim,groups,match", [(4, 3, 1, "in_features=16 is not divisible by dim=3"),
                                                 (4, 4, 5, "out_features=24 is not divisible by groups=5"),
                                                 (64, 4, 3, "only 32 sub-vectors per codebook, fewer than "
                                                            "codebook_size=64")])
def test_bad_shapes_are_user_errors(k, dim, groups, match):
    with pytest.raises(UserError, match=match):
        VQLinear.from_linear(linear(16, 24), CodebookSpec(k, dim), groups=groups)


@pytest.mark.parametrize("groups", [1, 3])
def test_inference_and_autograd_decode_match_reference(groups):
    """Mutation caught: the no-grad gather indexes the wrong group's codebook (groups=3) -> not equal."""
    layer = random_vq(16, 24, 8, 4, groups=groups)
    ref = reference_weight(layer)
    with torch.no_grad():
        assert torch.equal(layer.weight(), ref)  # the gather path
    assert torch.equal(layer.weight(), ref)  # autograd on: index_select with its fixed-order backward
    assert layer.weight().requires_grad


def peak_bytes(fn):
    """Peak CPU bytes allocated while fn() runs, freed memory subtracted: from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_peak_bytes_sees_temporaries():
    w = torch.randn(100, 100)
    assert peak_bytes(lambda: w.double().float()) == 100 * 100 * (8 + 4)  # the float64 temporary counts
    one = 100 * 100 * 4
    assert one <= peak_bytes(lambda: [(w * 2).sum() for _ in range(3)]) < 2 * one  # freed in turn: one at a time


def quantized_layer(kind):
    """A 2304 x 1024 quantized layer: 589824 sub-vectors at d = 4, more than two decode chunks."""
    if kind == "rtn":
        return RTNLinear.from_linear(linear(1024, 2304), bits=2).eval()
    return random_vq(1024, 2304, 256, 4, groups=3 if kind == "vq groups" else 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["vq", "vq groups", "rtn"])
def test_forward_decodes_straight_into_the_compute_dtype(kind, dtype):
    """Peak extra memory of a first forward = the decoded weight in the compute dtype, int32 indices and the output:
    no float32 weight cast afterwards, no int64 copy of every index, no second temporary; a second forward reuses
    the workspace buffers and allocates only its output (mutation: a fresh weight per call -> fails)."""
    layer = quantized_layer(kind)
    release_workspace()
    with torch.no_grad():  # inference: the workspace buffer
        fp32_weight = layer.weight()
        layer.to(dtype)
        weight = layer.weight()
        x = torch.randn(2, 1024, dtype=dtype)
        release_workspace()
        first = peak_bytes(lambda: layer(x))
        out = layer(x)
        again = peak_bytes(lambda: layer(x))
    assert weight.dtype == dtype and out.dtype == dtype
    weight_bytes = 2304 * 1024 * dtype.itemsize
    index_bytes = 0 if kind == "rtn" else 4 * 2304 * 1024 // 4
    assert first <= weight_bytes + index_bytes + out.nbytes + 4096, (first, weight_bytes)
    assert again <= out.nbytes + 4096, again
    if kind == "rtn":  # codes * scale + min rounded in the low dtype: within a few of its ulps of the fp32 decode
        torch.testing.assert_close(weight.float(), fp32_weight, rtol=2e-2, atol=2e-3)
    else:  # a lookup commutes with the cast: exactly the cast float32 decode
        assert torch.equal(weight, hard_reconstruct(layer.codebook.detach(), layer.indices).reshape(2304, 1024))
        assert torch.equal(weight, fp32_weight.to(dtype))
