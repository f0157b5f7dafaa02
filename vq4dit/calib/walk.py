"""The block-wise walk's plan and state, shared by the walk (calib/blockwise.py) and the memory plan
(jobs/memory_plan.py), so that what the plan predicts is what the walk does.

WalkPlan: from the recorded wiring alone, which table each block reads (the quantized chain in sequential mode,
else the FP chain), which references die after it (no later block reads them), and which dying tensors its outputs
may overwrite (a block's FP targets a dying FP block output, sequential mode only: nobody reads the FP inputs
afterwards; its quantized outputs a dying tensor of the quantized chain). WalkState: the two chains, the end-to-end
pass's points and the next block; what a checkpoint saves and a resume reads back.
"""
from dataclasses import dataclass

import torch

from vq4dit.calib.calls import leaves
from vq4dit.calib.capture import storage_dtype
from vq4dit.calib.endpass import EndPoints, points_tensors
from vq4dit.calib.replay import Replay
from vq4dit.calib.tables import Chains, Out, ref_of


def last_uses(calls):
    """{table reference: index of the last block that reads it}."""
    last = {}
    for i, call in enumerate(calls):
        for node in leaves(call.inputs):
            last[ref_of(node)] = i
    return last


@dataclass
class BlockStep:
    """Block `index` of the walk: its FP inputs (the FP chain), the inputs its layers train on, the references that
    die after it, and the tensors its FP targets (`fp_reuse`) and quantized outputs (`q_reuse`) may overwrite."""

    index: int
    fp_inputs: Replay
    inputs: Replay
    dying: list
    fp_reuse: list
    q_reuse: list


@dataclass
class WalkPlan:
    """The walk over recorded block `calls` (CalibrationSet.calls), sequential (block i trains on the quantized
    chain's inputs) or not (on the FP chain's), over `rows` points whose slots are `batched` or constant."""

    calls: list
    batched: dict
    rows: int
    sequential: bool

    def __post_init__(self):
        self.last_use = last_uses(self.calls)

    def step(self, i, chains):
        """The BlockStep of block i on the tables `chains` (Chains) as they stand when the walk reaches it. A
        reference no block reads (an unused output) dies after the block that follows its own."""
        dying = [ref for ref in chains.fp if self.last_use.get(ref, -1) <= i]
        fp_inputs = Replay(self.calls[i], chains.fp, self.batched, self.rows)
        if not self.sequential:
            return BlockStep(i, fp_inputs, fp_inputs, dying, [], [])
        return BlockStep(i, fp_inputs, Replay(self.calls[i], chains.q, self.batched, self.rows), dying,
                         [chains.fp[ref] for ref in dying if isinstance(ref, Out)], [chains.q[ref] for ref in dying])


def allocator(store, reusable):
    """Output storage: a dying input of the same shape and dtype when there is one (written in place), else new."""
    def alloc(outs, num_rows):
        free, chosen = list(reusable), []
        for o in outs:
            shape, dtype = (num_rows, *o.shape[1:]), storage_dtype(o, store.token_dtype)
            j = next((j for j, t in enumerate(free) if tuple(t.shape) == shape and t.dtype == dtype), None)
            chosen.append(free.pop(j) if j is not None else store.empty(shape, dtype))
        return chosen
    return alloc


@dataclass
class WalkState:
    """Where the walk stands: the chains' tables, the end-to-end pass's points (None: no pass) and the next block."""

    chains: Chains
    points: EndPoints | None = None
    next_block: int = 0

    @classmethod
    def start(cls, cset, sequential, e2e):
        return cls(Chains.from_slots(cset.slots, sequential), EndPoints.take(cset) if e2e else None)

    @classmethod
    def from_tensors(cls, acts, batched, sequential, next_block):
        """The state a checkpoint's activations `acts` ({name: tensor}, from to_tensors) describe."""
        return cls(Chains.from_tensors(acts, sequential), EndPoints.from_tensors(acts, batched), next_block)

    def to_tensors(self, done):
        """{name: tensor} to checkpoint: the tables the next block needs (none once the walk is `done`) and the
        pass's points."""
        return {**({} if done else self.chains.to_tensors()), **points_tensors(self.points)}

    def advance(self, step, targets, q_outs, release, last=False):
        """Block step.index is done: its FP and quantized outputs join the tables, the dying references leave them
        (`release(tensor)` frees what no table holds any more); after the `last` block the pass keeps its FP
        targets at its points."""
        if last and self.points is not None:
            self.points.set_targets(targets)
        self.chains.advance(step.index, targets, q_outs, step.dying, release)
        self.next_block = step.index + 1


class _CountingStore:
    """An ActivationStore stand-in for walk_peaks: meta tensors, bytes counted."""

    def __init__(self, token_dtype, held):
        self.token_dtype, self.held = token_dtype, held

    def empty(self, shape, dtype):
        t = torch.empty(shape, dtype=dtype, device="meta")
        self.held += t.numel() * t.element_size()
        return t

    def release(self, t):
        self.held -= t.numel() * t.element_size()


def walk_peaks(plan, slots, outputs, token_dtype):
    """[bytes the walk's tables hold at most while block i is calibrated] of WalkPlan `plan`, by walking it with
    meta tensors: `slots` {key: the recorded slot as stored (M rows, or a constant)}, outputs[i] the tensors block i
    returns (any rows: only their trailing shape and dtype matter). The walk's own code decides what dies and what
    is overwritten, so this cannot drift from it."""
    store = _CountingStore(token_dtype, sum(t.numel() * t.element_size() for t in slots.values()))
    walk, peaks = WalkState(Chains.from_slots(slots, plan.sequential)), []
    for i, outs in enumerate(outputs):
        step = plan.step(i, walk.chains)
        targets = allocator(store, step.fp_reuse)(outs, plan.rows)
        q_outs = allocator(store, step.q_reuse)(outs, plan.rows) if plan.sequential else None
        peaks.append(store.held)
        walk.advance(step, targets, q_outs, store.release)
    return peaks
