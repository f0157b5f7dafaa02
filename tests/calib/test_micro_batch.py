"""--micro-batch: gradient accumulation over micro-batches gives the one-pass update (issue 31 item 2)."""
import copy

import pytest
import torch

from tests.calib.conftest import tiny_config
from vq4dit.calib.micro import micro_losses, minibatch_loss
from vq4dit.calib.train import Trainer
from vq4dit.jobs.config import QuantizeConfig, load_config
from vq4dit.jobs.memory_plan import Planned, memory_plan
from vq4dit.jobs.plan_sources import dit_source, meta_dit
from vq4dit.models.adapters.dit import DiTAdapter
from vq4dit.models.loading import load_dit
from vq4dit.utils.errors import UserError
from vq4dit.vq import CodebookSpec, quantize_linears


def embedded_block(rows=12, dtype=torch.float32):
    """Block 0 of the embedded digits DiT (128 wide, 64 tokens), its Linears soft VQ, and loss_fn(idx) -> L_d of
    the minibatch idx against the FP block's outputs on random inputs of `rows` points."""
    model, _ = load_dit(None)
    teacher = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(rows, 64, 128, generator=g), torch.randn(rows, 128, generator=g)  # (M, T, D), (M, D)
    with torch.no_grad():
        target = teacher(x, c)
    block = copy.deepcopy(teacher)
    layers = list(quantize_linears(block, CodebookSpec(16, 2, 2, kmeans_iters=4), include=r".",
                                           progress=False).values())
    block.to(dtype)
    x, c, target = x.to(dtype), c.to(dtype), target.to(dtype)
    return block, layers, lambda idx: torch.nn.functional.mse_loss(block(x[idx], c[idx]), target[idx])


def one_update(micro_batch, dtype):
    """({name: gradient}, L_d) of one update of the embedded block in `dtype` on the minibatch of rows 0..9."""
    block, layers, loss_fn = embedded_block(dtype=dtype)
    config = tiny_config(micro_batch=micro_batch, lambda_r=0.1).calibration
    trainer = Trainer(layers, config)
    trainer.step(minibatch_loss(loss_fn, torch.arange(10), config, "cpu"))
    return {name: p.grad for name, p in block.named_parameters() if p.grad is not None}, trainer.loss


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("micro_batch", [1, 3])
def test_micro_batches_give_the_one_pass_update(micro_batch, dtype, tol):
    """The gradients from micro-batches of 1 and 3 rows (uneven: 3+3+3+1), ratio logits, codebooks and biases,
    equal the one-pass ones within `tol` of each tensor's largest, and so does L_d (mutations: parts not scaled by
    their share of the minibatch, or the regulariser added to every part, or the last uneven part dropped -> off
    by 1e-2 and more). float32: the sums run in another order (measured: at most 1.9e-6 of the largest, the
    codebooks' gradients, sums of thousands of terms); float64 shows the accumulation is exact math. The gradients,
    not the parameters after the step: RMSprop's first step is lr * g / |g|, so a gradient element that cancels to
    about 0 turns its rounding into a visible parameter difference whatever the batching."""
    whole, loss = one_update(None, dtype)
    parts, micro_loss = one_update(micro_batch, dtype)
    assert whole.keys() == parts.keys() and len(whole) == 15  # 5 Linears: logits, codebook, bias
    for name, grad in whole.items():
        torch.testing.assert_close(parts[name], grad, rtol=0, atol=tol * grad.abs().max().item(), msg=name)
    torch.testing.assert_close(micro_loss, loss, rtol=tol, atol=0)


def test_micro_losses_run_one_forward_at_a_time():
    """Each part's forward runs only when the previous part is consumed (mutation: a list built up front -> every
    micro-batch's activations held at once, the memory the flag bounds)."""
    calls = []
    parts = micro_losses(lambda idx: calls.append(len(idx)) or torch.tensor(1.0), torch.arange(7), 3)
    assert calls == []
    first = next(parts)
    assert calls == [3] and first.item() == pytest.approx(3 / 7)
    assert [round(p.item() * 7) for p in parts] == [3, 1] and calls == [3, 3, 1]


def test_micro_batch_is_refused_where_it_does_nothing():
    """--micro-batch with --calib online, or below 1, is one clear error naming the flag (mutation: the online
    check dropped -> accepted and ignored)."""
    with pytest.raises(UserError, match="micro_batch.*online"):
        QuantizeConfig.from_flat({"calib": "online", "micro_batch": 2}).validate()
    with pytest.raises(UserError, match="micro_batch=0"):
        QuantizeConfig.from_flat({"micro_batch": 0}).validate()
    assert "micro_batch" not in QuantizeConfig().to_dict()  # default: config.yaml as before


def test_the_memory_plan_holds_a_micro_batch_of_activations():
    """The plan's block training bytes (embedded DiT, batch 16) fall with --micro-batch 2, and --micro-batch 16 (the
    whole minibatch) plans as none (mutation: the plan still at batch_size rows -> equal; at micro_batch rows
    when it is larger than the batch -> larger)."""
    def block_bytes(micro_batch):
        config = load_config(overrides={"ckpt": None, "micro_batch": micro_batch})
        dit = dit_source(config.model)
        return memory_plan(Planned(meta_dit(dit[0]), DiTAdapter(), dit[1]), config, runtime=0).block_bytes

    whole = block_bytes(None)
    assert block_bytes(2) < 0.5 * whole and block_bytes(32) == whole
