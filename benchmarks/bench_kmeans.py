"""Benchmark vq.kmeans against scikit-learn KMeans on a DiT-XL/2 fc1-shaped weight (4608 x 1152, d=4, k=256).

Both get the same points and the same thread count; inertia of both is recomputed the same way (float64, every
point with its nearest centroid). Writes a markdown table (default benchmarks/results/kmeans.md).

    python benchmarks/bench_kmeans.py                 # full benchmark (scikit-learn takes about a minute)
    python benchmarks/bench_kmeans.py --rows 1152     # quicker, smaller weight
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq.kmeans import kmeans  # noqa: E402
from vq4dit.vq.nearest import nearest_two  # noqa: E402


def weight_like(rows, cols, seed):
    """Xavier-scaled normal truncated at 3 std: the distribution of a freshly initialised DiT Linear."""
    g = torch.Generator().manual_seed(seed)
    std = (2.0 / (rows + cols)) ** 0.5
    return torch.nn.init.trunc_normal_(torch.empty(rows, cols), std=std, a=-3 * std, b=3 * std, generator=g)


def inertia(x, centroids):
    _, sqdist, _ = nearest_two(x.double(), torch.as_tensor(centroids).double())
    return sqdist.sum().item()


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4608)
    p.add_argument("--cols", type=int, default=1152)
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="runs of vq.kmeans (scikit-learn runs once)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kmeans.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = weight_like(args.rows, args.cols, seed=0).reshape(-1, args.dim)  # (N, d)
    n = x.shape[0]
    rows = []

    (c, _), times = timed(lambda: kmeans(x, args.k, iters=args.iters, seed=0), args.repeats)
    rows.append(("vq.kmeans (default: subsample fit + 10 full passes)", times, inertia(x, c)))
    (c, _), times = timed(lambda: kmeans(x, args.k, iters=args.iters, seed=0, fit_points_per_cluster=None), 1)
    rows.append((f"vq.kmeans, {args.iters} Lloyd iterations on all points", times, inertia(x, c)))
    (c, _), times = timed(lambda: kmeans(x, args.k, iters=args.iters, seed=0, init="authors"), 1)
    rows.append((f"vq.kmeans init=authors: k-means++ on all points, exactly {args.iters} Lloyd iterations, "
                 "no re-seeding", times, inertia(x, c)))
    if not args.skip_sklearn:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        with threadpool_limits(args.threads):
            km, times = timed(lambda: KMeans(n_clusters=args.k, n_init=1, max_iter=args.iters, init="k-means++",
                                             random_state=0).fit(x.numpy()), 1)
        rows.append((f"scikit-learn KMeans (n_init=1, max_iter={args.iters}, {km.n_iter_} iterations run)",
                     times, inertia(x, km.cluster_centers_)))

    ref_time, ref_inertia = statistics.median(rows[-1][1]), rows[-1][2]
    lines = [
        "# k-means benchmark: vq.kmeans vs scikit-learn",
        "",
        f"Points: a {args.rows} x {args.cols} weight (xavier-scaled truncated normal) cut into d={args.dim} "
        f"sub-vectors: N = {n:,}; k = {args.k}; {args.threads} threads; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
        "",
        f"Command: `python benchmarks/bench_kmeans.py {' '.join(sys.argv[1:])}`",
        "",
        "| method | time (s, median) | runs | inertia | vs last row: speed-up | inertia |",
        "|---|---|---|---|---|---|",
    ]
    for name, times, value in rows:
        med = statistics.median(times)
        lines.append(f"| {name} | {med:.2f} | {len(times)} | {value:.4f} | {ref_time / med:.1f}x | "
                     f"{100 * (value / ref_inertia - 1):+.2f}% |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
