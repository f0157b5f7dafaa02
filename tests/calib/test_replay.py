import pytest
import torch

from tests.calib.toy import ToyAdapter, ToyTransformer
from vq4dit.calib.cache import ActivationStore
from vq4dit.calib.capture import Schedule, capture, step_filter
from vq4dit.calib.replay import Replay, block_loss, rows_to, run_chain, sweep
from vq4dit.models.adapters import TeacherPlan


def toy_set(depth=3, num_samples=4):
    model = ToyTransformer(depth=depth).eval()
    adapter = ToyAdapter()
    plan = TeacherPlan(num_samples=num_samples, steps=3, cfg_scale=1.0, seed=0, batch_size=3)
    schedule = Schedule(adapter.teacher_runs(model, plan, "cpu"), step_filter(3, 2), num_samples * 2)
    cset = capture(model, adapter.blocks(model), schedule, ActivationStore(token_dtype=torch.float32), progress=False)
    return model, adapter, cset


@torch.no_grad()
def test_run_chain_reproduces_the_models_own_block_outputs():
    model, adapter, cset = toy_set()
    blocks = [m for _, m in adapter.blocks(model)]
    rows = torch.tensor([5, 0, 2])
    outs = run_chain(blocks, cset, rows, "cpu")
    e, h = cset.slots["s0.1"][rows], cset.slots["s0.0"][rows]
    temb, rope = cset.slots["s0.2"][rows], cset.slots["s0.3"]
    for i, block in enumerate(blocks):
        e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb, rope=rope)
        assert torch.equal(outs[i][0], e) and torch.equal(outs[i][1], h)


@torch.no_grad()
def test_sweep_in_place_over_an_input_equals_a_fresh_output():
    model, adapter, cset = toy_set()
    block = adapter.blocks(model)[0][1]
    fresh, _ = sweep(block, Replay(cset.calls[0], cset.slots, cset.batched, cset.rows), "cpu",
                     alloc=lambda outs, n: [torch.empty(n, *o.shape[1:]) for o in outs], chunk=3)
    table = {k: v.clone() for k, v in cset.slots.items()}
    in_place, _ = sweep(block, Replay(cset.calls[0], table, cset.batched, cset.rows), "cpu",
                        alloc=lambda outs, n: [table["s0.1"], table["s0.0"]], chunk=3)  # outputs over the inputs
    assert in_place[0] is table["s0.1"] and torch.equal(in_place[0], fresh[0]) and torch.equal(in_place[1], fresh[1])


def test_block_loss_weighs_every_output_element_equally():
    outs = [torch.zeros(2, 3), torch.zeros(2, 1)]
    targets = [torch.ones(2, 3), torch.full((2, 1), 2.0)]
    assert block_loss(outs, targets).item() == (6 * 1 + 2 * 4) / 8  # not the mean of the two MSEs (1 and 4)


@pytest.mark.parametrize("rows", [slice(2, 5), torch.tensor([4, 0, 3])])
def test_rows_to_gives_the_rows_on_the_device(rows):
    """rows_to(t, rows, device) is t[rows] on the device: on a CPU directly, to a GPU through pinned memory (checked
    where one is present). Mutation: the pinned buffer filled from the wrong rows (t[:len(rows)]) -> fails there."""
    t = torch.arange(60.0).view(6, 10).half()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = rows_to(t, rows, device)
        assert got.device.type == device and got.dtype == t.dtype
        assert torch.equal(got.cpu(), t[rows])
