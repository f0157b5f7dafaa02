"""Data-parallel calibration (quantize.py under torchrun): the split of the teacher's rows and of the minibatches,
what the processes compute together, resuming per rank, and 2 gloo processes against 1 on the embedded model."""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.calib.test_replay import toy_set
from tests.conftest import free_port
from vq4dit.calib.checkpoints import STATE_DIR, Checkpoint, CheckpointStore
from vq4dit.calib.moments import block_input_moments
from vq4dit.calib.replay import Replay
from vq4dit.calib.shared import shared_block_loss, shared_input_moments
from vq4dit.calib.teacher import TeacherShare
from vq4dit.cli.quantize import build_parser, config_overrides
from vq4dit.jobs.config import load_config
from vq4dit.jobs.quantize import quantize
from vq4dit.jobs.runkey import RunKey
from vq4dit.models.adapters import TeacherPlan
from vq4dit.utils import distributed
from vq4dit.utils.errors import UserError

KEY = RunKey({"iters": 2}, ())


def recorded_order(trajectories, batch, kept, copies):
    """Slow reference: (trajectory, kept step, copy) of each row, in the order one process sampling `trajectories`
    in consecutive batches of `batch` records them (per batch, per step, the model call's copy-major rows)."""
    out = []
    for s in range(0, len(trajectories), batch):
        part = trajectories[s:s + batch]
        out += [(t, k, c) for k in range(kept) for c in range(copies) for t in part]
    return out


@pytest.mark.parametrize("n,size,kept,copies", [(4, 2, 3, 2), (64, 2, 12, 2), (100, 3, 2, 1), (130, 2, 2, 2),
                                                (5, 4, 1, 2)])
def test_teacher_shares_are_the_single_process_rows(n, size, kept, copies):
    """Every rank's rows, read through the rank's own recording order, name the single process's row of the same
    (trajectory, step, copy), and the ranks' rows partition the single-process set. Catches a copy-major /
    trajectory-major mix-up, an offset of a partial last batch, or trajectories dealt to two ranks."""
    plan = TeacherPlan(n, 10, 1.5, 0, 64)
    single = {key: row for row, key in enumerate(recorded_order(list(range(n)), 64, kept, copies))}
    seen = []
    for rank in range(size):
        share = TeacherShare.of(plan, kept, copies, rank, size)
        mine = [t for t in range(n) if share.owned[t]]
        assert 64 % share.plan.batch_size == 0
        expected = [single[key] for key in recorded_order(mine, share.plan.batch_size, kept, copies)]
        assert share.rows.tolist() == expected
        seen += expected
    assert sorted(seen) == list(range(n * kept * copies))


def test_minibatch_rows_are_split_without_loss_or_overlap():
    """RowShard.local over the ranks gives back each row of a global minibatch exactly once. Catches an
    off-by-one in the position table or rows dropped when a rank holds none of the batch."""
    total, idx = 24, torch.tensor([5, 0, 23, 7, 12, 13])
    shards = [distributed.RowShard(np.arange(r, total, 3), total) for r in range(3)]
    got = sorted(int(s.rows[p]) for s in shards for p in s.local(idx))
    assert got == sorted(idx.tolist())
    assert shards[0].below(7) == 3  # rows 0, 3, 6


def test_owners_balance_by_cost():
    """Longest first to the least loaded rank; one rank owns everything. Catches round-robin by position."""
    assert distributed.owners([6, 1, 4, 4, 3], 2) == [0, 1, 1, 1, 0]  # loads 6+3 and 4+4+1
    assert distributed.owners([6, 1, 4], 1) == [0, 0, 0]


def test_a_fit_costs_more_with_more_inputs_at_the_same_weights():
    """DiT's fc2 (in 4x wider than fc1, as many weights) costs more to fit, so on DiT-S/2's five shapes neither
    process holds both it and two others. Mutation: the cost of a fit as its weight count alone (fc1, fc2 and proj on
    one process: about 10.7 s of fits per block against 8.2 s on the other, measured) -> fails."""
    from torch import nn

    from vq4dit.calib.shared import fit_cost, layer_owners

    fc1, fc2 = nn.Linear(384, 1536, device="meta"), nn.Linear(1536, 384, device="meta")
    assert fit_cost(fc2) > fit_cost(fc1)
    block = [nn.Linear(384, o, device="meta") for o in (1152, 384, 1536)] + [fc2, nn.Linear(384, 2304, device="meta")]
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(distributed, "size", lambda: 2)
        owner = layer_owners(block)  # qkv, proj, fc1, fc2, adaLN
    assert owner[2] == owner[3] and owner.count(owner[3]) == 2  # fc1 and fc2 together, the other three elsewhere


class Counted:
    """shared_block_loss(...) whose forward records how many rows each call computes (`rows`)."""

    def __init__(self, *args):
        self.loss, self.rows, self._forward = shared_block_loss(*args), [], None
        self._forward, self.loss.forward = self.loss.forward, self.forward

    def forward(self, batch, rows):
        outs = self._forward(batch, rows)
        self.rows.append(len(outs[0]))
        return outs


def toy_targets(cset):
    """Random targets of the toy block's two outputs at every point (rows that differ: a row taken for another
    changes the loss)."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(cset.rows, *t.shape[1:], generator=generator) for t in (cset.slots["s0.1"], cset.slots["s0.0"])]


# --- two gloo processes on the toy model ----------------------------------------------------------------------------

def _toy_worker(rank, size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    distributed.init("cpu")
    model, adapter, cset = toy_set(num_samples=150)  # 300 rows: two chunks of 256
    name, block = adapter.blocks(model)[0]
    names = [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    shard = distributed.RowShard(np.concatenate([np.arange(s, min(s + 5, cset.rows)) for s in
                                                 range(5 * rank, cset.rows, 5 * size)]), cset.rows)
    local = {k: t[shard.rows] if cset.batched[k] else t for k, t in cset.slots.items()}
    replay = Replay(cset.calls[0], local, cset.batched, len(shard.rows))
    result = {"moments": shared_input_moments(block, name, names, replay, shard, "cpu")}
    # the loss of a global minibatch, its gradient summed by GradSync: rank 0 holds 6 of its 10 rows, rank 1 4
    targets = toy_targets(cset)
    idx = torch.tensor([3, 17, 4, 250, 9, 11, 6, 299, 0, 2])
    counted = Counted(block, replay, [t[shard.rows] for t in targets], shard, "cpu")
    loss = sum(counted.loss.parts(idx))
    block.zero_grad()
    loss.backward()
    params = list(block.parameters())
    result["loss"] = distributed.GradSync().reduce(params, loss.detach())
    result["grads"] = [p.grad.clone() for p in params]
    # the same in micro-batches of 3 of this rank's 5 rows (--micro-batch)
    block.zero_grad()
    total = 0.0
    for part in counted.loss.parts(idx, 3):
        part.backward()
        total = total + part.detach()
    result["micro_loss"] = distributed.GradSync().reduce(params, total)
    result["micro_grads"] = [p.grad.clone() for p in params]
    # a minibatch of 1 row (held by rank 0) leaves rank 1 nothing to compute
    result["one_row"] = [p.requires_grad for p in counted.loss.parts(idx[:1], 3)]
    result["rows"] = counted.rows
    # resume: rank 0 saved generation 1 and was killed waiting for rank 1, which had not saved it
    store = CheckpointStore(out, KEY)
    store.save(Checkpoint(acts={"a": torch.tensor([rank])}, wiring={}))
    if rank == 0:
        def killed():
            raise InterruptedError
        barrier, distributed.barrier = distributed.barrier, killed
        with pytest.raises(InterruptedError):
            store.save(Checkpoint(1, acts={"a": torch.tensor([10])}))
        distributed.barrier = barrier
    result["resumed"] = CheckpointStore(out, KEY).load().acts["a"].item()
    try:  # another run's state: rank 0 refuses it, and every rank stops with it
        CheckpointStore(out, RunKey({"iters": 3}, ()))
    except UserError as e:
        result["refused"] = str(e)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    distributed.shutdown()


def test_two_processes_compute_the_single_process_moments_gradients_and_resume_point(tmp_path):
    """Two gloo processes, each holding every other run of 5 rows of the toy set:
    - the input moments of the block's Linears are bit-identical to one process's (each layer on the rank that fits
      it). Catches chunks summed per rank (a float rounding apart, which the output-aware fit turns into other
      codewords), rows gathered out of order, or the chunk's rows mis-cut;
    - the minibatch's 10 rows, 6 held by rank 0, are computed 5 and 5 (calib/balance.py: one row's inputs and targets
      sent to rank 1), and the summed per-rank loss shares and gradients equal the global minibatch's. Catches
      each rank computing the rows it holds (6 and 4), a row sent from the wrong position or received in place of
      another, normalising by the local row count; and so do they accumulated over micro-batches of 3 of each
      rank's rows (--micro-batch). Catches a part normalised by its own row count, or micro-batches cut from the
      global minibatch; a 1-row minibatch leaves rank 1 one 0-d zero without gradient;
    - a rank that saved a generation the other did not goes back to the previous one. Catches resuming each rank at
      its own last checkpoint (ranks at different blocks);
    - another run's state refused by rank 0 stops every rank with a UserError. Catches rank 1 going on into agree's
      collective alone (a gloo traceback under rank 0's one-line error)."""
    mp.spawn(_toy_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert "iters 2 -> 3" in results[0]["refused"] and "rank 0 refused" in results[1]["refused"]
    model, adapter, cset = toy_set(num_samples=150)
    name, block = adapter.blocks(model)[0]
    names = [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    single = block_input_moments(block, name, names, Replay(cset.calls[0], cset.slots, cset.batched, cset.rows),
                                 "cpu")
    fitted = {**results[0]["moments"], **results[1]["moments"]}
    assert sorted(fitted) == sorted(names) and not set(results[0]["moments"]) & set(results[1]["moments"])
    for n in names:
        assert torch.equal(fitted[n], single[n]), n
    idx = torch.tensor([3, 17, 4, 250, 9, 11, 6, 299, 0, 2])
    targets = toy_targets(cset)
    whole = distributed.RowShard(np.arange(cset.rows), cset.rows)
    replay = Replay(cset.calls[0], cset.slots, cset.batched, cset.rows)
    block.zero_grad()
    loss = sum(shared_block_loss(block, replay, targets, whole, "cpu").parts(idx))
    loss.backward()
    for r in results:
        assert torch.allclose(r["loss"], loss.detach(), rtol=1e-6)
        assert torch.allclose(r["micro_loss"], loss.detach(), rtol=1e-6)
        for g, micro, p in zip(r["grads"], r["micro_grads"], block.parameters()):
            assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-8)
            assert torch.allclose(micro, p.grad, rtol=1e-5, atol=1e-8)
    # 5 rows each (one of rank 0's sent to rank 1), then micro-batches of 3 and 2; the 1-row minibatch on rank 0
    assert [r["rows"] for r in results] == [[5, 3, 2, 1], [5, 3, 2]]
    assert [r["one_row"] for r in results] == [[True], [False]]
    assert [r["resumed"] for r in results] == [0, 1]


# --- quantize.py under torchrun: 2 gloo processes against 1 on the embedded model ---------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# small: two blocks quantized (the walk still passes all six), 4 trajectories x 2 steps x CFG = 16 points in
# batches of 16 over 8 rows per process. kmeans start: the output-aware fit (the default) turns a float rounding
# of its inputs into other codewords (see docs/usage.md "Several processes"), and rows sampled in other batch sizes
# differ by such roundings on a CPU
SMALL = ["--iters", "6", "--calib-samples", "4", "--calib-timesteps", "2", "--steps", "4", "--kmeans-iters", "2",
         "--include", r"^blocks\.[01]\.", "--codebook-init", "kmeans"]


def torchrun(out, *flags, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "quantize.py", "--out", str(out), *SMALL, *flags], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def kill_after_first_block(out, timeout=120):
    """Start the 2-process run and SIGKILL it (torchrun and both ranks) once both ranks saved block 0."""
    run = torchrun(out, start_new_session=True)
    state = out / STATE_DIR / "rank-1" / "state.json"
    deadline = time.monotonic() + timeout
    while run.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(state.read_text())["next_block"] >= 1:
                os.killpg(run.pid, signal.SIGKILL)
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-calibration"


def test_two_processes_killed_and_resumed_give_the_single_process_artifact(tmp_path):
    """quantize.py under torchrun with 2 gloo processes, killed after block 0 and rerun: the rerun resumes at block 1
    and the artifact has the single process's codeword indices but for at most 1 in 1000 of each layer, codebooks
    within 1e-4 relative (norm of the difference) and biases within 1e-4 relative (1e-6 absolute). The gradients
    summed over two processes round differently from one process's, which moves a few codebook entries by one or two
    float16 steps of 2^-11 relative and can tip a near-tie of the hardening: measured 9e-6 and no index apart on one
    CPU (2026-12-04), 1.4e-5 and 1 index of 12288 on another (2026-12-05). Catches a data split that is not the
    single-process minibatch (other rows, or a loss normalised per rank), a branch taken on one rank only, a rank
    resuming at another block or from another rank's rows, and rank 1 writing the artifact (a race) or its own
    checkpoints over rank 0's. The rerun streams the model (--stream on, which is not in the run key): streaming
    under torchrun builds each block's layers split between the processes and lands where one unstreamed process
    does. The single run's log: the blocks without a quantized layer make no update. Catches the walk training them
    (6 updates of forwards that change nothing, the full --iters in a real run)."""
    single = tmp_path / "single"
    quantize(load_config(None, config_overrides(build_parser().parse_args(SMALL))), str(single), progress=False)
    # blocks 2-5 hold no quantized layer: walked (their outputs feed the next block) without an update
    blocks = [json.loads(line) for line in (single / "calib_log.jsonl").read_text().splitlines()]
    assert [b["updates"] for b in blocks] == [6, 6, 0, 0, 0, 0]
    assert all(b["mse_after"] == b["mse_before"] for b in blocks[2:])
    out = tmp_path / "two"
    kill_after_first_block(out)
    rerun = torchrun(out, "--stream", "on")  # the teacher streamed through the device (not in the run key)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "resuming calibration at block 1" in err
    assert "streaming (--stream on)" in err
    assert not (out / STATE_DIR).exists()
    a, b = load_file(single / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        if key.endswith("codebook"):
            assert (x.float() - y.float()).norm() <= 1e-4 * x.float().norm(), key
        elif x.is_floating_point():
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), key
        else:  # near-ties of the hardening may fall the other way
            assert (x != y).sum() <= x.numel() // 1000, key


def end_pass_line(log):
    """(error before, error after, points) of the end-to-end pass's log line."""
    found = re.search(r"end-to-end pass: chain end error (\S+) -> (\S+) over (\d+) points", log)
    return float(found[1]), float(found[2]), int(found[3])


def test_the_end_to_end_pass_under_torchrun_is_the_single_process_pass(tmp_path, caplog):
    """--e2e-iters under torchrun, 2 gloo processes: the pass runs over the single process's points (each process its
    own), its chain end errors before and after are the single process's (4 significant digits, as logged), and the
    artifact has the single process's indices (but for 1 in 1000), codebooks within 2e-3 relative and biases within
    2e-2 relative (norms of the difference; measured at 12 updates 6e-5 and 2.4e-4 on one CPU, 5.1e-4 and 5.0e-3 on
    another: RMSprop's first updates are near sign updates, so a gradient entry near zero that rounds to the other
    sign when summed over two processes moves by the learning rate; without the gradient sum the log line's errors
    differ by more than 1e-3 and a bias by 3e-2). Catches each process training on its own points (no gradient sum),
    the pass's points taken from one process's rows as if they were all, and an end error measured on one process's
    points only."""
    flags = ["--e2e-iters", "12"]
    single = tmp_path / "single"
    caplog.set_level(logging.INFO, logger="vq4dit.calib.endpass")
    quantize(load_config(None, config_overrides(build_parser().parse_args(SMALL + flags))), str(single),
             progress=False)
    out = tmp_path / "two"
    run = torchrun(out, *flags)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    one, two = end_pass_line(caplog.text), end_pass_line(err)
    assert one[2] == two[2] == 16 and one[0] > one[1]
    assert two[:2] == pytest.approx(one[:2], rel=1e-3)
    a, b = load_file(single / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key, x in a.items():
        y = b[key]
        if x.is_floating_point():
            bound = 2e-3 if key.endswith("codebook") else 2e-2
            assert (x.float() - y.float()).norm() <= bound * x.float().norm(), key
        else:  # near-ties of the hardening may fall the other way
            assert (x != y).sum() <= x.numel() // 1000, key
