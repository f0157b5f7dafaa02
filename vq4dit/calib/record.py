"""Record what the transformer blocks see while the full-precision teacher samples (zero-data calibration).

Forward hooks on the model and on every block watch each model call (one sampler step). At the selected steps
every block call is taken apart into its tensors (calib/calls.py), and each input tensor is traced to where it
came from by identity:
- an output of an earlier block in the same model call ({"out": [block, k]}): the chain between blocks, e.g.
  the hidden states, or the (encoder_hidden_states, hidden_states) pair of a two-stream block;
- an input seen earlier in the call ({"slot": key}): a tensor shared by blocks, e.g. DiT's conditioning c;
- otherwise a new slot, stored: block 0's hidden states, and anything the model computes between blocks.
This wiring is found from the recording itself, not written per model, and must be the same at every step.
Only slots are stored (one row per calibration point); block outputs are recomputed while calibration walks
the blocks (calib/replay.py), so the cache holds the block-0 inputs, not depth x (M, T, D) targets. The recorder
itself holds the slots of the call and, by default, no block output: an output is known by a weak reference (its
identity while it lives), so the model frees it as its own forward would; `keep_outputs` keeps them for the
LiveCall (online calibration's targets, the memory plan's shapes).
"""
import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch

from vq4dit.calib.calls import flatten, map_leaves
from vq4dit.utils.errors import UserError, error_detail

logger = logging.getLogger(__name__)


@dataclass
class BlockCall:
    """How block `name` is called: `inputs` is the spec of {"args": [...], "kwargs": {...}} whose tensor leaves are
    {"slot": key} or {"out": [block, k]}; `outputs` is the spec of its return value ({"t": k} leaves)."""

    name: str
    inputs: dict
    outputs: dict

    def to_json(self):
        return {"name": self.name, "inputs": self.inputs, "outputs": self.outputs}


@dataclass
class LiveCall:
    """One recorded model call: the wiring, the slot tensors, every block's output tensors, the model's inputs."""

    calls: list
    slots: dict  # key -> tensor, as the model produced it (on its device)
    outputs: list  # per block: [tensors]
    rows: int  # batch rows of this model call
    model_args: tuple = ()
    model_kwargs: dict = field(default_factory=dict)
    batched: dict | None = None  # key -> whether the slot holds one row per batch row (BlockRecorder tell_batched)


def batch_rows(args, kwargs):
    """Rows of a model call: the leading dimension of its first tensor argument."""
    _, tensors = flatten({"args": list(args), "kwargs": kwargs})
    if not tensors or tensors[0].dim() == 0:
        raise UserError("the model's first tensor argument has no batch dimension; cannot record its blocks")
    return tensors[0].shape[0]


class BlockRecorder:
    """Hooks on `model` and its `blocks` [(name, module)] that hand every selected model call to `on_call(LiveCall)`.

    `keep(step)` says whether the step-th model call of the current trajectory batch (0 = the first, noisiest)
    is recorded; `new_batch()` restarts the step count; `keep_outputs`: the LiveCall holds every block's outputs
    (else its `outputs` is empty and the recorder holds none); `tell_batched`: the LiveCall says which slots are
    batched, found once, at the first recorded call (tell_batched). Use as a context manager: hooks are removed on
    exit.
    """

    def __init__(self, model, blocks, keep, on_call, keep_outputs=False, tell_batched=False):
        self.model, self.blocks, self.keep, self.on_call = model, blocks, keep, on_call
        self.keep_outputs, self.tell_batched, self.batched, self.muted = keep_outputs, tell_batched, None, False
        self.index = {id(module): i for i, (_, module) in enumerate(blocks)}
        self.step = -1
        self.live = None
        self._handles = []

    def new_batch(self):
        self.step = -1

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post, with_kwargs=True))
        for _, module in self.blocks:
            self._handles.append(module.register_forward_pre_hook(self._block_pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._block_post, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.live = None

    def _model_pre(self, module, args, kwargs):
        if self.muted:
            return
        self.step += 1
        if self.live is not None:
            raise RuntimeError("nested model call while recording")
        if self.keep(self.step):
            self.live = {"calls": [], "slots": {}, "outputs": [], "rows": batch_rows(args, kwargs), "seen": {},
                         "args": args, "kwargs": kwargs}

    def _block_pre(self, module, args, kwargs):
        live = self.live
        if live is None:
            return
        i = self.index[id(module)]
        if i != len(live["calls"]):
            raise UserError(f"block {self.blocks[i][0]} was called out of order (expected "
                            f"{self.blocks[len(live['calls'])][0]}); calibration needs every block called once per "
                            "model call, in order")
        spec, tensors = flatten({"args": list(args), "kwargs": kwargs}, where=self.blocks[i][0])

        def trace(node):
            t = tensors[node["t"]]
            ref, source = live["seen"].get(id(t), (None, None))
            if ref is None or ref() is not t:  # never seen, or a freed tensor's id taken by a new one
                key = f"s{i}.{node['t']}"
                live["slots"][key] = t
                source = {"slot": key}
                live["seen"][id(t)] = (weakref.ref(t), source)
            return source

        live["calls"].append(BlockCall(self.blocks[i][0], map_leaves(spec, trace), None))

    def _block_post(self, module, args, kwargs, output):
        live = self.live
        if live is None:
            return
        i = self.index[id(module)]
        spec, tensors = flatten(output, where=f"{self.blocks[i][0]} output")
        live["calls"][i].outputs = spec
        if self.keep_outputs:
            live["outputs"].append(tensors)
        for k, t in enumerate(tensors):
            live["seen"][id(t)] = (weakref.ref(t), {"out": [i, k]})

    def _model_post(self, module, args, kwargs, output):
        live, self.live = self.live, None
        if live is None:
            return
        if len(live["calls"]) != len(self.blocks):
            raise UserError(f"only {len(live['calls'])} of {len(self.blocks)} blocks ran in a model call; "
                            "calibration needs every block called once per model call")
        call = LiveCall(live["calls"], live["slots"], live["outputs"], live["rows"], live["args"], live["kwargs"])
        if self.tell_batched:
            self.batched = self.batched or tell_batched(self, call)
            call.batched = self.batched
        self.on_call(call)


def slot_is_batched(t, rows):
    """Whether a slot tensor holds one row per batch row, by its shape alone (else it is a constant shared by all
    rows): a constant whose first dimension happens to be `rows` is taken for batched (tell_batched tells them
    apart)."""
    return t.dim() > 0 and t.shape[0] == rows


def rearranged(value, rows):
    """A model input of a call of `rows` rows with its rows reversed (rows > 1) or doubled (rows == 1): a tensor or
    a list or tuple (Qwen-Image's per-row img_shapes, txt_seq_lens) whose length is `rows`, also inside a dict or a
    shorter list or tuple (attention kwargs); anything else as it is."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows:
        return value.flip(0) if rows > 1 else torch.cat([value, value])
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return type(value)(value[::-1] if rows > 1 else [*value, *value])
    if isinstance(value, (list, tuple)):
        return type(value)(rearranged(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: rearranged(v, rows) for k, v in value.items()}
    return value


def tell_batched(recorder, call):
    """{slot key: batched} of LiveCall `call`, told by running the model once more on its inputs rearranged
    (reversed rows, or one row doubled) with `recorder` muted: a batched slot follows its rows, a constant does
    not. By shape alone (slot_is_batched) a constant whose first dimension equals the call's rows, such as a
    4-token text-rotary table in a call of 4 rows (which under torchrun's smaller per-process batches is common),
    was cached per row and broke the walk. Where the rerun fails, the shapes decide, with a warning."""
    rows, seen = call.rows, {}
    args = [rearranged(a, rows) for a in call.model_args]
    kwargs = {k: rearranged(v, rows) for k, v in call.model_kwargs.items()}
    recorder.muted = True
    try:
        with torch.no_grad(), BlockRecorder(recorder.model, recorder.blocks, lambda step: True,
                                            lambda probe: seen.update(probe.slots)):
            recorder.model(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise  # not a model that cannot take its rows rearranged: the run would fail at its next step anyway
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        logger.warning("could not rerun the model on its inputs rearranged (%s: %s); its slots are taken as "
                       "batched by their shapes", type(e).__name__, error_detail(e))
    finally:
        recorder.muted = False
    return {key: follows_rows(t, seen.get(key), rows) for key, t in call.slots.items()}


def follows_rows(t, probe, rows):
    """Whether slot `t` of a call of `rows` rows is batched, given `probe`, the slot when the call's inputs were
    rearranged (None: not seen, the shape decides): with one row, it doubled; with more, it changed with the order
    of the rows (a slot whose rows are all alike is taken as batched: a constant's are not)."""
    shaped = slot_is_batched(t, rows)
    if not shaped or probe is None:
        return shaped
    if rows == 1:
        return probe.shape[0] == 2
    return not torch.equal(probe, t) or torch.equal(t, t.flip(0))


@contextlib.contextmanager
def recording(model, blocks, keep, on_call, keep_outputs=False, tell_batched=False):
    with BlockRecorder(model, blocks, keep, on_call, keep_outputs, tell_batched) as recorder:
        yield recorder


@torch.no_grad()
def run_teacher(model, blocks, runs, keep, on_call, progress_total=None, progress=True):
    """Run the teacher's sampler batches `runs` [(trajectories, run())] with the recorder attached (its LiveCalls
    say which slots are batched)."""
    from tqdm import tqdm

    bar = tqdm(total=progress_total, desc="teacher", unit="trajectory", disable=not progress, leave=False)
    with recording(model, blocks, keep, on_call, tell_batched=bool(blocks)) as recorder:
        for count, run in runs:
            recorder.new_batch()
            run()
            bar.update(count)
    bar.close()
