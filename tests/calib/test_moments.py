"""Input moments of a block's Linears (calib/moments.py) against a plain capture of every input they saw."""
import torch

from tests.calib.test_replay import toy_set
from vq4dit.calib.moments import block_input_moments
from vq4dit.calib.replay import Replay, call_block


@torch.no_grad()
def test_block_moments_equal_the_second_moment_of_every_input_seen():
    """E[x x^T] per Linear over all rows of the replay (in chunks), against X^T X / M of the inputs recorded by a
    plain hook on one call over all rows. Catches moments of the wrong module or tensor (e.g. the output), a count
    off by the chunking, or hooks left behind."""
    model, adapter, cset = toy_set(num_samples=5)
    name, block = adapter.blocks(model)[0]
    names = [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    replay = Replay(cset.calls[0], cset.slots, cset.batched, cset.rows)
    for ref_name in names:
        seen = []
        handle = block.get_submodule(ref_name[len(name) + 1:]).register_forward_pre_hook(
            lambda _, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
        call_block(block, replay, slice(None), "cpu")
        handle.remove()
        x = torch.cat(seen)  # (M, n)
        moments = block_input_moments(block, name, [ref_name], replay, "cpu")
        assert torch.allclose(moments[ref_name], x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-7)  # float32 chunk sums
    assert all(not m._forward_pre_hooks for m in block.modules())
