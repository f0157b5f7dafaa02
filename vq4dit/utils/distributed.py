"""Sharding sample indices over torchrun processes and gathering the results on rank 0.

Launched plainly, everything is a no-op (world size 1). Under `torchrun --nproc_per_node N` the
environment holds RANK/WORLD_SIZE/LOCAL_RANK; gloo is used on CPU and nccl on CUDA.
"""
import os

import numpy as np
import torch
import torch.distributed as dist


def world():
    """(rank, world_size) from the torchrun environment; (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched_sizes():
    """(processes in all, processes on this machine) from the torchrun environment, (1, 1) when not launched by
    torchrun: read without joining a process group (a --dry-run plans a torchrun run without starting one)."""
    size = world()[1]
    return size, int(os.environ.get("LOCAL_WORLD_SIZE", size))


def init(device):
    """Join the process group when launched with WORLD_SIZE > 1; returns the device this rank uses."""
    rank, size = world()
    if size == 1:
        return device
    if str(device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return device


def shutdown():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(n, rank, size, block=1):
    """Positions 0..n-1 handled by `rank`: blocks of `block` consecutive positions dealt round-robin.

    With block = the batch size every batch holds the same samples as in a single-process run,
    so the images are bitwise the same whatever the number of processes.
    """
    starts = np.arange(rank * block, n, size * block)
    return np.concatenate([np.arange(s, min(s + block, n)) for s in starts]) if len(starts) else np.arange(0)


def gather_rows(local, n, device, block=1, chunk=256):
    """Reassemble uint8 rows (n_local, ...) sharded by `shard(n, ..., block)` into (n, ...) on rank 0 (None elsewhere).

    Chunks of at most `chunk` rows per rank are all-gathered in turn, so memory stays bounded.
    """
    rank, size = world()
    if size == 1:
        return local
    counts = [len(shard(n, r, size, block)) for r in range(size)]
    comm_device = device if str(device).startswith("cuda") else "cpu"
    out = np.empty((n, *local.shape[1:]), dtype=local.dtype) if rank == 0 else None
    for start in range(0, max(counts), chunk):
        piece = torch.zeros((chunk, *local.shape[1:]), dtype=torch.uint8)
        part = torch.from_numpy(np.ascontiguousarray(local[start:start + chunk]))
        piece[:len(part)] = part
        bufs = [torch.empty_like(piece, device=comm_device) for _ in range(size)]
        dist.all_gather(bufs, piece.to(comm_device))
        if rank == 0:
            for r, buf in enumerate(bufs):
                valid = max(0, min(chunk, counts[r] - start))
                out[shard(n, r, size, block)[start:start + valid]] = buf[:valid].cpu().numpy()
    return out


# --- data-parallel calibration (quantize.py under torchrun) ---------------------------------------------------------

def active():
    """Whether this process is one of several in an initialised process group (else every helper below is the
    single-process computation, or a no-op)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def size():
    return dist.get_world_size() if active() else 1


def barrier():
    if active():
        dist.barrier()


def _comm_device(t):
    """Where a collective on `t` runs: this rank's GPU under nccl (a CPU tensor goes there and back), the CPU under
    gloo."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())


def all_sum_(t):
    """Sum `t` over the ranks in place (its dtype; moved to the backend's device and back); returns t."""
    if active():
        buf = t.to(_comm_device(t))
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
    return t


def all_min(value):
    """The smallest of the ranks' `value`s (a number), on every rank."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    t = t.to(_comm_device(t))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()


def mean_error(total, count):
    """total / count summed over the ranks (floats: a sum of squared errors and its element count), the same number
    on every rank so that a comparison of errors takes the same branch everywhere. One process: total / count."""
    if not active():
        return total / count
    both = all_sum_(torch.tensor([total, count], dtype=torch.float64))
    return (both[0] / both[1]).item()


def broadcast_(t, src):
    """`t` on every rank := its value on rank `src`, in place; returns t. Integers travel as int64 (gloo has no
    int16)."""
    if active():
        buf = t.to(_comm_device(t), t.dtype if t.is_floating_point() else torch.int64)
        dist.broadcast(buf, src)
        if buf is not t:
            t.copy_(buf)
    return t


def broadcast_tensors(tensors, src):
    """{name: tensor} on every rank := rank `src`'s `tensors` (CPU tensors; the other ranks pass None): their names,
    shapes and dtypes first, then each tensor. One process: `tensors` itself."""
    if not active():
        return tensors
    meta = [[(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()]
            if rank() == src else None]
    dist.broadcast_object_list(meta, src, device=_comm_device(torch.empty(0)))
    if rank() == src:
        return {k: broadcast_(t.contiguous(), src) for k, t in tensors.items()}
    return {k: broadcast_(torch.empty(shape, dtype=getattr(torch, dtype)), src) for k, shape, dtype in meta[0]}


class _Slot(int):
    """Where a tensor stood in a structure sent by broadcast_nested: its position in the tensors sent beside it."""


def broadcast_nested(value, src):
    """`value` on every rank := rank `src`'s `value` (the other ranks pass None): nested lists and tuples of CPU
    tensors and plain values (None, numbers, strings). The structure travels as an object, the tensors as
    broadcast_tensors sends them. One process: `value` itself."""
    if not active():
        return value
    tensors = []

    def strip(v):
        if torch.is_tensor(v):
            tensors.append(v)
            return _Slot(len(tensors) - 1)
        return type(v)(strip(x) for x in v) if isinstance(v, (list, tuple)) else v

    skeleton = [strip(value) if rank() == src else None]
    dist.broadcast_object_list(skeleton, src, device=_comm_device(torch.empty(0)))
    sent = broadcast_tensors({str(i): t for i, t in enumerate(tensors)} if rank() == src else None, src)

    def fill(v):
        if isinstance(v, _Slot):
            return sent[str(int(v))]
        return type(v)(fill(x) for x in v) if isinstance(v, (list, tuple)) else v

    return fill(skeleton[0])


def exchange(outgoing, incoming, device):
    """Point to point: send `outgoing` {destination rank: [tensors]} and receive `incoming` {source rank: [(shape,
    dtype)]} -> {source rank: [tensors on `device`]}. Every rank calls it with its side of one plan: what a rank sends
    to another is what that one expects from it, in order. The tensors travel on the backend's device."""
    if not outgoing and not incoming:
        return {}
    comm = _comm_device(torch.empty(0, device=device))
    ops, received = [], {}
    for dest, tensors in sorted(outgoing.items()):
        ops += [dist.P2POp(dist.isend, t.to(comm).contiguous(), dest) for t in tensors]
    for src, specs in sorted(incoming.items()):
        received[src] = [torch.empty(shape, dtype=dtype, device=comm) for shape, dtype in specs]
        ops += [dist.P2POp(dist.irecv, t, src) for t in received[src]]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return {src: [t.to(device) for t in tensors] for src, tensors in received.items()}


def gather_rows_to(local, dst):
    """On rank `dst`: [each rank's rows `local` (n_r, ...) as (n_r, e) tensors, e the elements per row] (n_r may be
    0, and a rank without rows need not know the rows' shape; dtypes alike); None elsewhere."""
    device = _comm_device(local)
    flat = local.reshape(len(local), -1).to(device)
    shapes = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(size())]
    dist.all_gather(shapes, torch.tensor([flat.shape[0], flat.shape[1] if len(flat) else 0], device=device))
    counts, width = [int(c[0]) for c in shapes], max(int(c[1]) for c in shapes)
    padded = torch.zeros((max(counts), width), dtype=flat.dtype, device=device)
    padded[:len(flat)] = flat
    bufs = [torch.empty_like(padded) for _ in counts] if rank() == dst else None
    dist.gather(padded, bufs, dst=dst)
    return None if bufs is None else [b[:n].to(local.device) for b, n in zip(bufs, counts)]


def owners(costs, world_size):
    """The rank that computes each job of a list whose costs are `costs` (numbers): longest first, each to the
    least loaded rank (ties: the lower rank). A pure function of the costs, so every rank computes the same map."""
    load, owner = [0.0] * world_size, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[j], load[r] = r, load[r] + costs[j]
    return owner


class GradSync:
    """Sums the gradients of a parameter list and a loss value over the ranks in one collective per update: each
    rank's loss is the share of the global loss of the rows it computed (their squared errors over the global
    element count), so the sums are the gradients and loss of the global minibatch. A parameter no backward reached
    on this rank (it computed none of the minibatch's rows) contributes zeros. `collective(flat)` sums a flat
    tensor in place over the ranks (None: leaves it as it is, for the memory plan's updates on the meta device)."""

    def __init__(self, collective=all_sum_):
        self.collective = collective

    def reduce(self, params, loss):
        """Replace p.grad of `params` by the sums over the ranks; returns the summed `loss` (a 0-d tensor)."""
        device = loss.device
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device)
                          for p in params] + [loss.detach().reshape(1).to(device, torch.float32)])
        if self.collective is not None:
            self.collective(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return flat[offset].clone()  # not a view: it would keep the whole flat sum alive as long as the loss is kept


class RowShard:
    """The calibration points this rank holds: `rows` (M_local,) their positions in the single-process calibration
    set, ascending, out of `total` points. A minibatch is drawn over all `total` points on every rank alike (the
    single process's draw); its rows are dealt evenly over the ranks (calib/balance.py), each rank sending the
    rows it holds (`local`) beyond its share to ranks short of theirs."""

    def __init__(self, rows, total):
        self.rows, self.total = torch.as_tensor(rows, dtype=torch.int64), int(total)
        self._position = torch.full((self.total,), -1, dtype=torch.int64)
        self._position[self.rows] = torch.arange(len(self.rows))

    def local(self, idx):
        """Local positions of the points of `idx` (global positions (B,)) that this rank holds, in idx's order."""
        pos = self._position[idx]
        return pos[pos >= 0]

    def held(self, idx):
        """Which entries of `idx` (global positions (B,)) this rank holds: (B,) bool."""
        return self._position[idx] >= 0

    def below(self, n):
        """How many of this rank's points lie among the first n global points (a prefix of its rows)."""
        return int((self.rows < n).sum())
