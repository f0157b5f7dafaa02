"""A model whose blocks stay on the host in their stored dtype and visit the device, upcast, one at a time.

`HostBlocks(model, blocks, device)`: every tensor outside the `blocks` [(name, module)] moves to `device` in fp32 now
(embedders, final layer: small); each block keeps its host tensors (e.g. bf16, as the checkpoint stores them) and,
while it runs, holds fp32 copies on the device instead: forward pre and post hooks on the block (as diffusers'
sequential offload does, no edit of the model's code), or `resident(block)` around several calls (the block-wise
walk's sweeps). Upcasting a bf16 value to fp32 is exact, so the block computes what the model loaded in fp32
computes. The same Parameter objects stay in the model throughout (their data is swapped), so what holds a
parameter sees the resident copy while the block is resident. `.to()` of the whole model (a pipeline's .to(device))
leaves the blocks on the host: their `_apply` is pinned until `close()`.

On a GPU the copies of the block that comes next (in the blocks' order, the last followed by the first) start when a
block moves in (`CudaStager`), so they overlap the block's work: the device holds that one block more, in its stored
dtype (the memory plan counts it). A block moved in out of order (a probe, a resident block of the walk) takes its
copies itself, as on a CPU, where nothing is staged.
"""
import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def _tensors(module, recurse=True):
    """[(owner module, attribute name, is a parameter)] of `module`'s parameters and buffers."""
    owners = module.modules() if recurse else [module]
    return [(m, name, kind == "p") for m in owners for kind, table in (("p", m._parameters), ("b", m._buffers))
            for name, t in table.items() if t is not None]


def _set(owner, name, is_param, value):
    if is_param:
        owner._parameters[name].data = value
    else:
        owner._buffers[name] = value


def _get(owner, name, is_param):
    return owner._parameters[name].data if is_param else owner._buffers[name]


def upcast(t, device):
    """`t` on `device`, floats in fp32 (exact from bf16 or fp16)."""
    t = t.to(device)
    return t.float() if t.is_floating_point() else t


class CudaStager:
    """Copies a block's host tensors to a CUDA device ahead of use: a worker thread issues the copies on a side
    stream while the main thread runs the block before (a copy from pageable memory holds only the thread that
    issues it). The host tensors stay where they are (pageable, or views of the checkpoint files' mapped pages, shared
    by the processes of a machine), so the host memory is unchanged; the device holds one more block in its stored
    dtype."""

    def __init__(self, device):
        import concurrent.futures

        # the worker's current device is this one: a new thread starts on cuda:0, and leaving a stream context there
        # would open a CUDA context on GPU 0 in every torchrun rank
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.stream = torch.cuda.Stream(self.device)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vq4dit-stage",
                                                           initializer=torch.cuda.set_device, initargs=(self.index,))

    def _copy(self, tensors, ready):
        # the compute stream has passed the last upcast: the copies released then are free for these to reuse (a
        # second block's worth otherwise, which the memory plan does not count)
        ready.synchronize()
        with torch.cuda.stream(self.stream):
            staged = [t.to(self.device, non_blocking=True) for t in tensors]
            return staged, self.stream.record_event()

    def start(self, tensors):
        return self._pool.submit(self._copy, tensors, torch.cuda.current_stream(self.device).record_event())

    def finish(self, pending):
        """The staged copies, usable on the current stream (their memory kept until its work on them is done)."""
        staged, event = pending.result()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in staged:
            t.record_stream(current)
        return staged

    def close(self):
        self._pool.shutdown(wait=True)


class HostBlocks:
    """The blocks of `model` on the host, streamed to `device` (see the module's docstring); `moves` counts the
    times a block was moved in, `staged_in` those whose copies had been staged ahead (tests and logs). `stager`: what
    copies the next block ahead: "device" (CudaStager on a GPU, nothing on a CPU), None (nothing), or an object with
    CudaStager's start, finish and close."""

    def __init__(self, model, blocks, device, stager="device"):
        self.model, self.device, self.moves, self.staged_in = model, torch.device(device), 0, 0
        self.blocks = {id(block): (name, block) for name, block in blocks}
        keys = list(self.blocks)
        self._next = {key: keys[(i + 1) % len(keys)] for i, key in enumerate(keys)}
        if stager == "device":
            stager = CudaStager(self.device) if self.device.type == "cuda" else None
        self.stager = stager
        self._staged = None  # (block key, the stager's pending copies) of the block expected next
        self._host = {id(block): [(*ref, _get(*ref)) for ref in _tensors(block)] for _, block in blocks}
        self._depth = dict.fromkeys(self.blocks, 0)
        inside = {id(m) for _, block in blocks for m in block.modules()}
        for m in model.modules():
            if id(m) not in inside:
                for ref in _tensors(m, recurse=False):
                    _set(*ref, upcast(_get(*ref), self.device))
        self._handles, self._calls = [], dict.fromkeys(self.blocks, 0)
        self._hook()

    def _hook(self):
        for _, block in self.blocks.values():
            self._handles.append(block.register_forward_pre_hook(lambda m, args: self._call_in(m)))
            # always_call: a forward that raises (out of memory) still sends the block back to the host
            self._handles.append(block.register_forward_hook(lambda m, args, out: self._call_out(m), always_call=True))
            block._apply = lambda fn, recurse=True, block=block: block  # a pipeline's .to() leaves it on the host

    def _unhook(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, block in self.blocks.values():
            block.__dict__.pop("_apply", None)

    @contextlib.contextmanager
    def paused(self):
        """The blocks without this object's hooks and .to() pins for the context: a deep copy of the model made
        inside (the streamed student's skeleton) takes none of them along."""
        self._unhook()
        try:
            yield
        finally:
            self._hook()

    def _call_in(self, block):
        self._enter(block)
        self._calls[id(block)] += 1  # after: a move that raised leaves nothing for _call_out to send back

    def _call_out(self, block):
        # torch runs always_call hooks also when a pre-hook before ours raised (a probe that stops the model at this
        # block): our _call_in never ran then, and there is nothing to send back
        if self._calls[id(block)]:
            self._calls[id(block)] -= 1
            self._exit(block)

    def _enter(self, block):
        key = id(block)
        if self._depth[key] == 0:
            self.staged_in += self._move_in(key)
            self.moves += 1
            self._stage(self._next[key])  # after the move: its staged copies are released by now
        self._depth[key] += 1

    def _move_in(self, key):
        """Block `key`'s tensors upcast onto the device (from its staged copies where they are ready); whether they
        were. A move that raises (out of memory) leaves the block on the host, as it was."""
        host = self._host[key]
        try:
            staged = self._take(key)
            for (*ref, t), copy in zip(host, staged or [None] * len(host)):
                _set(*ref, upcast(t if copy is None else copy, self.device))
        except BaseException:
            for *ref, t in host:
                _set(*ref, t)
            raise
        return staged is not None

    def _take(self, key):
        """The staged copies of block `key`, or None; copies staged for another block are waited for and dropped."""
        staged, self._staged = self._staged, None
        if staged is None:
            return None
        copies = self.stager.finish(staged[1])
        return copies if staged[0] == key else None

    def _stage(self, key):
        if self.stager is not None and self._depth[key] == 0:
            self._staged = (key, self.stager.start([t for *_, t in self._host[key]]))

    def _exit(self, block):
        key = id(block)
        self._depth[key] -= 1
        if self._depth[key] == 0:
            for *ref, host in self._host[key]:
                _set(*ref, host)

    @contextlib.contextmanager
    def resident(self, block):
        """`block` on the device in fp32 for the whole context (its forward calls inside move nothing)."""
        self._enter(block)
        try:
            yield block
        finally:
            self._exit(block)

    def close(self):
        if self.moves:  # on a GPU, a move not staged ahead waited for its copies: the log says how many did
            logger.info("streamed %d blocks through %s: %d moves, %d of them staged ahead", len(self.blocks),
                        self.device, self.moves, self.staged_in)
        if self.stager is not None:
            with contextlib.suppress(Exception):  # a failed copy of a block no one will run must not mask the run's end
                self._take(None)
            self.stager.close()
        self._unhook()
        self.model, self.blocks, self._host = None, {}, {}  # no cycle keeps the host teacher alive after the run
