"""models/offload.py HostBlocks: blocks kept on the host as stored, upcast while they run, pinned against .to()."""
import copy
import logging

import pytest
import torch

from tests.calib.conftest import tiny_dit
from vq4dit.models.offload import HostBlocks


def bf16_dit():
    """A tiny DiT stored in bf16, and the same values in fp32 (what an fp32 load of its checkpoint gives)."""
    stored = tiny_dit(depth=3).to(torch.bfloat16).eval()
    return stored, copy.deepcopy(stored).float()


def test_a_streamed_model_computes_what_the_fp32_model_computes_and_keeps_its_blocks_bf16():
    """Mutations caught: a block left in fp32 after its forward (the post hook not restoring the host tensors); the
    parts outside the blocks not upcast (bf16 embedders: outputs differ); the block upcast to bf16's neighbour
    dtype fp16 (outputs differ)."""
    stored, fp32 = bf16_dit()
    offload = HostBlocks(stored, list(stored.blocks.named_children()), "cpu")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(stored(x, t, y), fp32(x, t, y))
    assert {p.dtype for p in stored.blocks.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in stored.x_embedder.parameters()} == {torch.float32}
    assert offload.moves == 3


def test_resident_moves_a_block_once_for_many_calls_and_to_leaves_blocks_on_the_host():
    """Mutations caught: every forward inside resident() moving the block again (no depth count: a walk's sweep
    would copy the block once per chunk); a pipeline's .to() converting the blocks (no _apply pin: the whole
    teacher on the device); close() leaving the pin behind."""
    stored, _ = bf16_dit()
    blocks = list(stored.blocks.named_children())
    offload = HostBlocks(stored, blocks, "cpu")
    block = blocks[1][1]
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad(), offload.resident(block):
        assert {p.dtype for p in block.parameters()} == {torch.float32}
        for _ in range(3):
            block(h, c)
    assert offload.moves == 1 and {p.dtype for p in block.parameters()} == {torch.bfloat16}
    stored.to(torch.float64)
    assert {p.dtype for p in stored.blocks.parameters()} == {torch.bfloat16}
    offload.close()
    stored.to(torch.float64)
    assert {p.dtype for p in stored.blocks.parameters()} == {torch.float64}


def test_a_forward_that_raises_sends_its_block_back_and_close_frees_the_teacher():
    """Mutations caught: the post hook without always_call (a forward that raises, e.g. out of memory, leaves the
    block in fp32 on the device for good, and every later call skips the move); close() neither removing the hooks
    nor dropping its references (a cycle block -> hook -> HostBlocks -> model keeps the host teacher alive until a
    full garbage collection; either measure alone breaks it)."""
    import gc
    import weakref

    stored, _ = bf16_dit()
    blocks = list(stored.blocks.named_children())
    offload = HostBlocks(stored, blocks, "cpu")
    block = blocks[0][1]
    broken = block.register_forward_pre_hook(lambda m, args: 1 / 0)  # runs after HostBlocks' own pre hook
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    try:
        block(h, c)
    except ZeroDivisionError:
        pass
    broken.remove()
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    offload.close()
    gc.collect()
    gc.disable()
    try:
        alive = weakref.ref(stored)
        del stored, blocks, block, offload
        assert alive() is None
    finally:
        gc.enable()


class CloneStager:
    """A stager for the CPU: the 'copies' are clones made at start; counts what is in flight."""

    def __init__(self):
        self.in_flight, self.most_in_flight, self.closed = 0, 0, False

    def start(self, tensors):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return [t.clone() for t in tensors]

    def finish(self, pending):
        self.in_flight -= 1
        return pending

    def close(self):
        self.closed = True


def test_the_next_block_is_staged_while_one_runs_and_the_result_is_the_same(caplog):
    """With a stager (a GPU's copies ahead of use, models.offload.CudaStager), each block moved in stages the next
    one, the last the first: in two forwards every move but the first takes staged copies, one staging at a time,
    and the outputs equal those of the unstaged stream bit for bit. A block moved in out of order drops what was
    staged and moves itself. Mutations caught: a block staging itself instead of the next (only the walk's repeats
    would be staged in); staged copies used for whatever block comes (the out-of-order block computes with another
    block's weights); staged copies never finished (the in-flight count grows)."""
    stored, fp32 = bf16_dit()
    blocks = list(stored.blocks.named_children())
    stager = CloneStager()
    offload = HostBlocks(stored, blocks, "cpu", stager=stager)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(stored(x, t, y), fp32(x, t, y))
    assert (offload.moves, offload.staged_in, stager.most_in_flight) == (6, 5, 1)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():  # block 0 is staged now; block 2 comes instead
        with offload.resident(blocks[2][1]) as block:
            assert torch.equal(block(h, c), fp32.blocks[2](h, c))
    assert (offload.moves, offload.staged_in, stager.in_flight) == (7, 5, 1)  # block 2 staged block 0 again
    with caplog.at_level(logging.INFO, logger="vq4dit.models.offload"):
        offload.close()
    assert stager.in_flight == 0 and stager.closed
    assert "streamed 3 blocks through cpu: 7 moves, 5 of them staged ahead" in caplog.text


class BrokenStager(CloneStager):
    """Its first finished staging breaks part way through the move (a tensor that cannot be copied, as an out of
    memory would)."""

    def finish(self, pending):
        pending = super().finish(pending)
        if not getattr(self, "broke", False):
            self.broke = True
            pending = [*pending[:2], torch.empty(pending[2].shape, device="meta"), *pending[3:]]
        return pending


def test_a_move_that_raises_leaves_the_block_on_the_host_and_the_next_call_moves_it():
    """A move that failed part way (out of memory in the upcast, a failed staged copy) left the block half on the
    device and its depth at -1 (the always_call post hook sent back a block that never came in): it never moved again
    and the run failed later with an unrelated error. Mutations caught: the call counted before the move; no
    restore of the host tensors when the move raises."""
    stored, fp32 = bf16_dit()
    blocks = list(stored.blocks.named_children())
    offload = HostBlocks(stored, blocks, "cpu", stager=BrokenStager())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 3])
    with torch.no_grad(), pytest.raises(NotImplementedError):
        stored(x, t, y)  # block 1's staged copies break
    assert {p.dtype for p in stored.blocks.parameters()} == {torch.bfloat16}
    assert set(offload._depth.values()) == {0}
    with torch.no_grad():
        assert torch.equal(stored(x, t, y), fp32(x, t, y))
