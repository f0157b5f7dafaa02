"""Recording block calls: the wiring between blocks is found from tensor identity, for any block signature."""
import weakref

import pytest
import torch

from tests.calib.conftest import tiny_dit
from tests.calib.toy import ToyAdapter, ToyTransformer
from vq4dit.calib.record import BlockRecorder, run_teacher, slot_is_batched
from vq4dit.models.adapters import TeacherPlan, adapter_for
from vq4dit.utils.errors import UserError


def record_one(model, blocks, *inputs, **kwargs):
    seen = []
    with BlockRecorder(model, blocks, keep=lambda step: True, on_call=seen.append, keep_outputs=True), \
            torch.no_grad():
        model(*inputs, **kwargs)
    return seen[0]


def test_dit_wiring_chains_the_tokens_and_shares_c():
    model = tiny_dit(depth=3)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    live = record_one(model, list(model.blocks.named_children()), x, t, y)
    assert [c.inputs for c in live.calls] == [
        {"dict": {"args": {"list": [{"slot": "s0.0"}, {"slot": "s0.1"}]}, "kwargs": {"dict": {}}}},
        {"dict": {"args": {"list": [{"out": [0, 0]}, {"slot": "s0.1"}]}, "kwargs": {"dict": {}}}},
        {"dict": {"args": {"list": [{"out": [1, 0]}, {"slot": "s0.1"}]}, "kwargs": {"dict": {}}}},
    ]
    tokens, c = model.embed(x, t, y)
    torch.testing.assert_close(live.slots["s0.0"], tokens)
    torch.testing.assert_close(live.slots["s0.1"], c)
    h = tokens
    for i, block in enumerate(model.blocks):
        h = block(h, c)
        torch.testing.assert_close(live.outputs[i][0], h)
    assert live.rows == 4


def test_two_stream_blocks_returning_swapped_tuples_are_wired_by_identity():
    """SD3 / Flux style: keyword arguments, (encoder, hidden) returned, an unbatched table shared by all blocks."""
    model = ToyTransformer(depth=3)
    x, ctx, t = torch.randn(5, 6, 4), torch.randn(5, 3, 8), torch.tensor([10, 20, 30, 40, 50])
    live = record_one(model, list(ToyAdapter().blocks(model)), x, ctx, t)
    kwargs = [c.inputs["dict"]["kwargs"]["dict"] for c in live.calls]
    assert kwargs[0] == {"hidden_states": {"slot": "s0.0"}, "encoder_hidden_states": {"slot": "s0.1"},
                         "temb": {"slot": "s0.2"}, "rope": {"slot": "s0.3"}}
    for i in (1, 2):  # hidden <- output 1 of the previous block, encoder <- output 0, temb and rope shared
        assert kwargs[i] == {"hidden_states": {"out": [i - 1, 1]}, "encoder_hidden_states": {"out": [i - 1, 0]},
                             "temb": {"slot": "s0.2"}, "rope": {"slot": "s0.3"}}
    assert live.calls[0].outputs == {"tuple": [{"t": 0}, {"t": 1}]}
    assert live.slots["s0.3"].shape == (9, 8)  # no batch dimension


def test_only_kept_steps_are_recorded_and_the_count_restarts_per_batch():
    model = tiny_dit(depth=2)
    adapter = adapter_for(model)
    plan = TeacherPlan(num_samples=3, steps=5, cfg_scale=1.5, seed=0, batch_size=2)
    seen = []
    run_teacher(model, adapter.blocks(model), adapter.teacher_runs(model, plan, "cpu"), lambda step: step in (0, 3),
                seen.append, progress=False)
    assert [live.rows for live in seen] == [4, 4, 2, 2]  # batches of 2 and 1 trajectories, CFG doubled, 2 steps each


def test_a_block_skipped_or_called_out_of_order_is_an_error():
    model = tiny_dit(depth=3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    blocks = list(model.blocks.named_children())
    with pytest.raises(UserError, match="out of order"):
        record_one(model, [blocks[1], blocks[0], blocks[2]], x, t, y)
    extra = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="only 3 of 4 blocks ran"):
        record_one(model, blocks + [("extra", extra)], x, t, y)


@pytest.mark.parametrize("keep_outputs", [False, True])
def test_the_recorder_holds_no_block_output_unless_asked(keep_outputs):
    """When the model call ends, the block outputs the recorder saw are freed (the model's forward drops each once the
    next block has run) unless keep_outputs asks for them. Mutation caught: outputs kept whatever keep_outputs (depth
    x (B, T, D) held on the device for the whole teacher forward)."""
    model = tiny_dit(depth=3)
    blocks, outputs, alive = list(model.blocks.named_children()), [], []
    for _, block in blocks:
        block.register_forward_hook(lambda m, args, out: outputs.append(weakref.ref(out)))

    def on_call(live):
        alive.append(sum(ref() is not None for ref in outputs))

    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    with BlockRecorder(model, blocks, lambda step: True, on_call, keep_outputs), torch.no_grad():
        model(x, t, y)
    assert alive == [3 if keep_outputs else 0]


@pytest.mark.parametrize("rows,table,alike", [(9, None, False), (1, 1, False), (9, None, True)])
def test_a_constant_whose_first_dimension_is_the_batch_is_told_from_a_batched_slot(rows, table, alike):
    """The toy's rope table has no batch dimension; at 9 rows (9 = its length) or 1 row (a 1-row table), its shape
    alone says batched, as it did for Qwen-Image's text-rotary table under torchrun (cached per row: the walk
    failed). Rerunning the call with its rows reversed (or one row doubled) tells it apart; slots whose rows are all
    alike (one prompt, one noise) stay batched, and the rerun is not counted as a sampler step. Mutations caught:
    the shape rule alone; one row not doubled (rows 1); rows alike taken for a constant."""
    model = ToyTransformer(depth=2)
    if table:
        model.rope = torch.randn(table, model.dim)
    x, ctx, t = torch.randn(rows, 6, 4), torch.randn(rows, 3, 8), torch.arange(rows) * 100
    if alike:
        x, ctx, t = x[:1].expand_as(x), ctx[:1].expand_as(ctx), t[:1].expand_as(t)
    seen = []
    with BlockRecorder(model, list(ToyAdapter().blocks(model)), lambda step: True, seen.append,
                       tell_batched=True) as recorder, torch.no_grad():
        model(x, ctx, t)
    assert len(seen) == 1 and recorder.step == 0
    assert slot_is_batched(seen[0].slots["s0.3"], rows)  # by its shape
    assert seen[0].batched == {"s0.0": True, "s0.1": True, "s0.2": True, "s0.3": False}


def test_per_row_inputs_inside_dicts_and_tuples_are_rearranged_too():
    """A per-row tensor inside the attention kwargs (a dict) or a pair was not reversed, so a slot computed from it
    looked constant (mutation: top-level tensors and lists only)."""
    from vq4dit.calib.record import rearranged

    rows = torch.arange(3.0)
    value = {"mask": rows, "pair": (rows, torch.zeros(5)), "shapes": [(1, 2, 2)] * 3, "flag": True}
    out = rearranged(value, 3)
    assert torch.equal(out["mask"], rows.flip(0)) and torch.equal(out["pair"][0], rows.flip(0))
    assert torch.equal(out["pair"][1], torch.zeros(5)) and out["shapes"] == [(1, 2, 2)] * 3 and out["flag"] is True
    one = rearranged({"mask": rows[:1], "lens": (7,)}, 1)
    assert torch.equal(one["mask"], torch.zeros(2)) and one["lens"] == (7, 7)
