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
