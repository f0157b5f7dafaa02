"""The native CPU gather (vq/kernels/native.py) against a Python loop: every codeword width and index dtype, groups
of codebooks, split over threads at uneven boundaries; an index out of range raises instead of reading outside the
codebook; the build is cached, and a missing or failing compiler leaves the decode on index_select."""
import logging
import os

import pytest
import torch

from vq4dit.vq.kernels import native


@pytest.fixture
def bind(monkeypatch):
    monkeypatch.setenv("VQ4DIT_NATIVE", "1")
    native._load.cache_clear()
    fn = native.native_gather()
    if fn is None:
        pytest.skip("the native gather could not be built here (no C compiler?)")
    yield fn
    native._load.cache_clear()


def slow_gather(table, indices):
    """One position at a time, in Python: out[i] = table[group of i][indices[i]]."""
    per_group = indices.shape[0] // table.shape[0]
    return torch.stack([table[i // per_group][int(index)] for i, index in enumerate(indices)])


# (row shape, dtype): rows of 1, 2, 4, 8 and 16 bytes take a typed copy, 12 and 6 bytes the byte copy
ROWS = [((), torch.uint8), ((), torch.bfloat16), ((), torch.float32), ((), torch.complex64),
        ((), torch.complex128), ((3,), torch.float32), ((3,), torch.float16)]


@pytest.mark.parametrize("row,dtype", ROWS)
@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_equals_the_slow_gather(bind, row, dtype, index_dtype):
    """Mutations caught: uint8 indices read as signed (indices >= 128 go wrong), a width's copy of the wrong size,
    the byte copy's offsets not scaled by the width, the group's table offset not scaled by k."""
    groups, k, n = 3, 200, 300
    table = (torch.randn(groups, k, *row) * 100).to(dtype)
    indices = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0)).to(index_dtype)
    indices[:2] = torch.tensor([k - 1, 128])  # the largest index, and one with the uint8 sign bit set
    out = torch.empty(n, *row, dtype=dtype)
    assert bind(table, indices, out)(1) is out
    assert torch.equal(out.view(torch.uint8), slow_gather(table, indices).view(torch.uint8))


@pytest.mark.parametrize("groups,threads", [(1, 2), (1, 7), (3, 2), (3, 7)])
def test_threads_cover_every_position_once(bind, groups, threads):
    """A large gather split over threads at uneven boundaries (n not a multiple of the thread count, shares that
    start and end inside a group) writes every position from its group's table (mutations: a share's piece of a
    group ending one short -> NaN left; a group's table offset not scaled by the codeword width -> wrong values)."""
    n = (threads * native.PARALLEL_MIN // groups + 5) * groups  # enough codewords for `threads` threads
    table = torch.randn(groups, 256, 4).view(torch.complex128).view(groups, 256)
    indices = torch.randint(0, 256, (n,), dtype=torch.uint8)
    out = torch.full((n,), complex(float("nan"), 0), dtype=torch.complex128)
    bind(table, indices, out)(threads)
    group = torch.arange(n) // (n // groups)
    assert torch.equal(out, table[group, indices.long()])


@pytest.mark.parametrize("threads", [1, 3])
def test_an_index_out_of_range_raises(bind, threads):
    """As index_select does (mutation: the bound check dropped -> the gather reads past the codebook)."""
    n = native.PARALLEL_MIN + 1
    table, indices = torch.randn(1, 100), torch.randint(0, 100, (n,), dtype=torch.uint8)
    indices[n - 1] = 100
    with pytest.raises(IndexError, match="index 100 out of range for a codebook of 100"):
        bind(table, indices, torch.empty(n))(threads)


def test_the_build_is_cached(tmp_path):
    """A second build finds the library of the first (same source, flags and compiler) instead of compiling."""
    compiler = native.shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    path = native.build(compiler, str(tmp_path))
    stamp = os.stat(path).st_mtime_ns
    assert native.build(compiler, str(tmp_path)) == path and os.stat(path).st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # the build's scratch directory is gone


@pytest.mark.parametrize("compiler,message", [("no-such-cc", "no C compiler"),
                                              ("false", "could not build or load the native decode")])
def test_without_a_working_compiler_the_decode_takes_index_select(monkeypatch, tmp_path, caplog, compiler, message):
    """No compiler, or one that fails (`false`): said once in the log, and the decode still equals the reference."""
    from vq4dit.vq.kernels.decode import gather_codewords

    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("VQ4DIT_NATIVE", "1")
    monkeypatch.setenv("VQ4DIT_CACHE", str(tmp_path))
    native._load.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger=native.__name__):
            assert native.native_gather() is None
        assert message in caplog.text
        codebook, indices = torch.randn(2, 8, 4), torch.randint(0, 8, (10,), dtype=torch.uint8)
        assert torch.equal(gather_codewords(codebook, indices), codebook[torch.arange(10) // 5, indices.long()])
    finally:
        native._load.cache_clear()
