"""The recorded calibration set equals what a hand-written DiT loop computes (the pre-record/replay inputs code)."""
import pytest
import torch

from tests.calib.conftest import reference_points, tiny_dit
from vq4dit.calib.blockwise import allocator
from vq4dit.calib.cache import ActivationStore
from vq4dit.calib.capture import Schedule, calib_steps, capture, capture_model_inputs, step_filter, to_cache
from vq4dit.calib.replay import Replay, call_block, sweep
from vq4dit.calib.tables import Out
from vq4dit.models.adapters import TeacherPlan, adapter_for


@pytest.mark.parametrize("steps,count", [(50, 25), (50, 1), (7, 7), (10, 3), (250, 25)])
def test_calib_steps_evenly_spaced_distinct(steps, count):
    kept = calib_steps(steps, count)
    assert len(kept) == count and len(set(kept)) == count
    assert kept == sorted(kept, reverse=True) and all(0 <= i < steps for i in kept)
    if count > 1:  # both ends of the trajectory, gaps differ by at most one step
        assert kept[0] == steps - 1 and kept[-1] == 0
        gaps = [a - b for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_step_filter_counts_model_calls_from_the_noisiest_step():
    keep = step_filter(10, 3)
    assert [call for call in range(10) if keep(call)] == sorted(10 - 1 - i for i in calib_steps(10, 3))


@torch.no_grad()
def test_recorded_set_and_replayed_targets_match_a_hand_written_dit_loop():
    model = tiny_dit(depth=3)
    adapter = adapter_for(model)
    plan = TeacherPlan(num_samples=5, steps=6, cfg_scale=1.5, seed=3, batch_size=2)
    rows = 5 * 3 * 2
    schedule = Schedule(adapter.teacher_runs(model, plan, "cpu"), step_filter(6, 3), rows)
    cset = capture(model, adapter.blocks(model), schedule, ActivationStore(), progress=False)
    x, t, y = reference_points(model, 5, 6, 3, 1.5, 3, batch_size=2)
    tokens, c = model.embed(x, t, y)
    assert cset.rows == rows and cset.batched == {"s0.0": True, "s0.1": True}
    assert cset.slots["s0.0"].dtype == torch.float16 and cset.slots["s0.1"].dtype == torch.float32
    assert torch.equal(cset.slots["s0.0"], tokens.half())
    torch.testing.assert_close(cset.slots["s0.1"], c)
    table = dict(cset.slots)
    h = tokens.half().float()
    for i, (name, block) in enumerate(adapter.blocks(model)):
        outs, _ = sweep(block, Replay(cset.calls[i], table, cset.batched, rows), "cpu",
                        alloc=allocator(ActivationStore(), []), chunk=7)
        h = block(h, c)
        torch.testing.assert_close(outs[0].float(), h, atol=2e-3, rtol=2e-3)  # fp16 cache between blocks
        table[Out(i, 0)] = outs[0]
        h = outs[0].float()


def test_model_inputs_for_held_out_metrics():
    model = tiny_dit(depth=2)
    adapter = adapter_for(model)
    plan = TeacherPlan(num_samples=3, steps=4, cfg_scale=1.5, seed=1, batch_size=2)
    calls = capture_model_inputs(model, adapter.teacher_runs(model, plan, "cpu"), step_filter(4, 2), progress=False)
    x, t, y = reference_points(model, 3, 4, 2, 1.5, 1, batch_size=2)
    assert torch.equal(torch.cat([args[0] for args, _ in calls]), x)
    assert torch.equal(torch.cat([args[1] for args, _ in calls]), t)
    assert torch.equal(torch.cat([args[2] for args, _ in calls]), y)


def test_values_beyond_the_cache_range_stop_the_run():
    assert to_cache(torch.full((2, 3, 4), 1e5), torch.float32).dtype == torch.float32
    with pytest.raises(FloatingPointError, match="range of the calibration cache.*--cache-dtype"):
        to_cache(torch.full((2, 3, 4), 1e5), torch.float16)


@torch.no_grad()
def test_a_table_as_long_as_the_batch_is_cached_once_and_replays_at_any_rows():
    """The toy's 9-row rope table under a teacher batch of 9 rows: capture keeps it once, as the constant it is, and
    a minibatch of 4 points replays block 0 as the teacher ran it (mutation: capture by the shapes alone -> the
    table cached per row, and the replay's rows take 4 of its 9 rows: a shape error)."""
    from tests.calib.toy import ToyAdapter, ToyTransformer

    model, adapter = ToyTransformer(depth=2), ToyAdapter()
    plan = TeacherPlan(num_samples=9, steps=2, cfg_scale=1.0, seed=0, batch_size=9)
    cset = capture(model, adapter.blocks(model), Schedule(adapter.teacher_runs(model, plan, "cpu"),
                                                          step_filter(2, 1), 9), ActivationStore(), progress=False)
    assert cset.batched == {"s0.0": True, "s0.1": True, "s0.2": True, "s0.3": False}
    assert torch.equal(cset.slots["s0.3"], model.rope)
    rows, block = torch.arange(4), model.transformer_blocks[0]
    outs = call_block(block, Replay(cset.calls[0], dict(cset.slots), cset.batched, 9), rows, "cpu")
    slot = {k: t[rows].float() for k, t in cset.slots.items() if cset.batched[k]}
    expected = block(hidden_states=slot["s0.0"], encoder_hidden_states=slot["s0.1"], temb=slot["s0.2"],
                     rope=model.rope)
    for out, want in zip(outs, expected):
        torch.testing.assert_close(out, want)
