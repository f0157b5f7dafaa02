"""Chunked nearest-codeword search against brute-force references (torch.cdist + sort)."""
import pytest
import torch

from vq4dit.vq.nearest import GPU_CHUNK_ELEMENTS, chunk_rows, distance_chunks, nearest_n, nearest_two


def points(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def sorted_sqdist(x, c):
    return (torch.cdist(x.double(), c.double()) ** 2).sort(1)  # (N, k) ascending: values, indices


@pytest.mark.parametrize("n,k,d,chunk", [(100, 7, 2, 16), (333, 32, 4, 1000), (50, 50, 3, 7), (9, 1, 2, 4)])
def test_nearest_two_matches_brute_force(n, k, d, chunk):
    x, c = points(n, d), points(k, d, seed=1)
    index, sqdist, sqdist2 = nearest_two(x, c, chunk)
    ref = sorted_sqdist(x, c)
    assert torch.equal(index, ref.indices[:, 0])
    assert torch.allclose(sqdist.double(), ref.values[:, 0], atol=1e-5)
    if k > 1:
        assert torch.allclose(sqdist2.double(), ref.values[:, 1], atol=1e-5)
    else:
        assert torch.isinf(sqdist2).all()


@pytest.mark.parametrize("n_nearest", [1, 2, 3])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_nearest_n_matches_brute_force(n_nearest, chunk):
    x, c = points(40, 4), points(16, 4, seed=1)
    index, sqdist = nearest_n(x, c, n_nearest, chunk)
    ref = sorted_sqdist(x, c)
    assert torch.equal(index, ref.indices[:, :n_nearest])
    assert torch.allclose(sqdist.double(), ref.values[:, :n_nearest], atol=1e-5)


def test_distance_chunks_cover_every_row_once():
    x, c = points(23, 3), points(5, 3, seed=1)
    rows = [r for r, _, _ in distance_chunks(x, c, 10)]
    assert [(r.start, r.stop) for r in rows] == [(0, 10), (10, 20), (20, 23)]
    full = torch.cat([part + x_sq[:, None] for _, part, x_sq in distance_chunks(x, c, 10)])  # (N, k)
    assert torch.allclose(full, torch.cdist(x, c) ** 2, atol=1e-5)


def test_distances_never_negative_for_points_on_codewords():
    c = points(8, 4) * 1e3  # large norms: the expansion cancels badly at distance 0
    _, sqdist, _ = nearest_two(c, c)
    _, sq_n = nearest_n(c, c, 2)
    assert (sqdist >= 0).all() and (sq_n >= 0).all()


def test_gpu_blocks_are_large_and_cpu_blocks_as_asked():
    """A CPU keeps the asked block (its artifacts stay as they were); a GPU takes blocks of GPU_CHUNK_ELEMENTS
    distances, never fewer rows than asked (mutation: the GPU size applied on a CPU, or divided by d not k -> fails)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(4096, 256, cpu) == 4096 and chunk_rows(5, 7, cpu) == 5
    assert chunk_rows(4096, 256, gpu) == GPU_CHUNK_ELEMENTS // 256 == 65536
    assert chunk_rows(4096, 1 << 16, gpu) == 4096 and chunk_rows(4096, 1, gpu) == GPU_CHUNK_ELEMENTS
