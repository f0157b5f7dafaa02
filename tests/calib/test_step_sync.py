"""A calibration update makes the host wait for the device only where it must read a value (issue 31 item 4).

On a GPU, a read of a device value (`.item()`, `bool(t)`, a boolean mask, `nonzero`) stalls the host until the
device has caught up, and the next kernels are not queued meanwhile. On a CPU nothing stalls, so the test records
the operations that would: a TorchDispatchMode sees every aten call of the forward, backward and optimizer step.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.calib.conftest import block_problem, tiny_config
from vq4dit.calib.micro import minibatch_loss
from vq4dit.calib.train import Trainer

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
         aten.unique_consecutive.default, aten._unique2.default, aten.equal.default, aten.is_nonzero.default}


class DeviceReads(TorchDispatchMode):
    """Records the aten calls that read a device value back to the host (READS, and indexing by a boolean mask),
    and the Tensor methods that copy values to Python without an aten call (tolist, numpy)."""

    def __init__(self):
        super().__init__()
        self.seen, self.saved = [], {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            method = self.saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, lambda t, *a, _m=method, _n=name, **k: self.seen.append(_n) or _m(t, *a, **k))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if func in READS or masks:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [{}, {"ratio_gate": "running_min"}, {"micro_batch": 3}])
def test_updates_between_selections_read_nothing_back(options):
    """Updates 1-9 (forward, backward, RMSprop step) read no device value, with rows frozen in one layer, with the
    running-minimum gate and with micro-batches; the selection at update 10 reads twice (every soft layer's frozen
    fraction at once, then their free-row counts at once). Mutations: `frozen.any()` back in masked_ratios, or
    `logits[~frozen]` (a boolean mask) in ratio_penalty, or the gate's `penalty.item()`, or one `.item()` per layer
    at selection -> fails."""
    layers, loss_fn, _ = block_problem()
    with torch.no_grad():
        layers[1].frozen[::3] = True  # some rows frozen from the start: the one-hot branch is taken
    config = tiny_config(select_every=10, batch_size=8, **options).calibration
    trainer = Trainer(layers, config)
    batches = [torch.randperm(64, generator=torch.Generator().manual_seed(u))[:8] for u in range(10)]
    for u, idx in enumerate(batches):
        with DeviceReads() as reads:
            trainer.step(minibatch_loss(loss_fn, idx, config, "cpu"))
        if u < 9:
            assert reads.seen == [], (u, reads.seen)
    assert reads.seen == ["tolist", "tolist"]
