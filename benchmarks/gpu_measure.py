"""What every section of benchmarks/gpu_check.py shares: the sizes it runs at (full, or tiny for --smoke on a CPU),
and timing and peak memory that work on any device.

Its own module so that gpu_check.py (run as __main__) and the section modules import one copy of it: `sizes is
SMOKE` in the k-means section must see the very object main chose.
"""
import dataclasses
import statistics
import time

import torch


@dataclasses.dataclass(frozen=True)
class Sizes:
    flux_dim: int = 3072
    flux_heads: int = 24
    flux_image_tokens: int = 4096
    flux_text_tokens: int = 512
    flux_batches: tuple = (1, 4)
    dit_hidden: int = 1152
    dit_heads: int = 16
    dit_tokens: int = 256
    dit_batch: int = 16
    dit_model: str = "DiT-XL/2"
    dit_input: int = 32  # latent size of 256 px images
    gemm: int = 8192
    kmeans_iters: int = 100


SMOKE = Sizes(flux_dim=64, flux_heads=2, flux_image_tokens=48, flux_text_tokens=16, flux_batches=(1, 2),
              dit_hidden=64, dit_heads=2, dit_tokens=16, dit_batch=4, dit_model="DiT-S/8", dit_input=16, gemm=256,
              kmeans_iters=4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak allocated device memory since reset_peak, GiB (None on a CPU, which has no such counter)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None

