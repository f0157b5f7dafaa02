"""One calibration update of one DiT block (issue 31 item 4): this checkout's code against another's, side by side.

An update is what the walk's minibatch loop does once: the block's forward on a minibatch with its Linears soft VQ
(k 256, d 4, n 2), the MSE to fixed targets, Trainer.step (backward, RMSprop step). Each (code, case) runs in a
fresh process, in turns (before, after, before, after, ...), each giving the median of its updates; the table
gives the median CPU time over its processes (time.process_time: on a shared machine the wall time of the same
code varied 2x from one process to the next) and the least wall time. Only the public API both checkouts share is
used (VQLinear via quantize_linears, CalibConfig, Trainer.step), so the other checkout may be any earlier commit:

    git archive f7dbe32 | tar -x -C /tmp/base          # the code before issue 31 item 4's step changes
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py --before /tmp/base  # -> benchmarks/results/step.md

Cases: the embedded model's block (128 wide, 4 heads, 64 tokens) at batch 16, and a DiT-B/2 block (768 wide, 12
heads, 256 tokens) at batch 2 (a CPU is slow at its matrix products; at a small batch the update's fixed costs,
the soft weights, show, as on a GPU). Random weights N(0, 0.02) and inputs N(0, 1).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"embedded block, batch 16": (128, 4, 64, 16), "DiT-B/2 block, batch 2": (768, 12, 256, 2)}


def child(repo, case, updates):
    """Runs in a fresh process with `repo` first on sys.path: [(wall seconds, CPU seconds of this process)] of each
    of `updates` updates of `case`."""
    sys.path.insert(0, repo)
    import torch

    from vq4dit.calib.config import CalibConfig
    from vq4dit.calib.train import Trainer
    from vq4dit.models.dit import DiTBlock
    from vq4dit.vq import CodebookSpec, quantize_linears

    hidden, heads, tokens, batch = CASES[case]
    torch.manual_seed(0)
    block = DiTBlock(hidden, heads)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    x, c = torch.randn(batch, tokens, hidden), torch.randn(batch, hidden)
    with torch.no_grad():
        target = block(x, c)
    layers = list(quantize_linears(block, CodebookSpec(256, 4, 2, kmeans_iters=2), include=r".",
                                   progress=False).values())
    trainer = Trainer(layers, CalibConfig(select_every=10 ** 6))  # no selection: every update the same work
    times = []
    for _ in range(updates + 1):  # the first one warms up
        start, cpu = time.perf_counter(), time.process_time()
        trainer.step(torch.nn.functional.mse_loss(block(x, c), target))
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return times[1:]


def run(repo, case, updates):
    """(median wall seconds, median CPU seconds) of an update of `case` with `repo`'s code, in a fresh process."""
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); from benchmarks.bench_step import child; "
            f"print(json.dumps(child({repo!r}, {case!r}, {updates})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def commit_of(repo):
    done = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or os.path.basename(repo.rstrip("/"))


def main(args):
    rows = []
    for case in CASES:
        seconds = {"before": [], "after": []}
        for _ in range(args.rounds):
            for label, repo in (("before", args.before), ("after", ROOT)):
                seconds[label].append(run(repo, case, args.updates))
        cpu = {k: statistics.median(c for _, c in v) for k, v in seconds.items()}
        wall = {k: min(w for w, _ in v) for k, v in seconds.items()}
        rows.append((case, cpu, wall, seconds))
        print(f"{case}: CPU s/update before {cpu['before']:.3f}, after {cpu['after']:.3f}", flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines = ["# One calibration update of one block, before and after", "",
             f"`OMP_NUM_THREADS={threads} python benchmarks/bench_step.py --before {args.before} --rounds "
             f"{args.rounds} --updates {args.updates}` ({__doc__.splitlines()[0]})", "",
             f"- before: {args.before} ({commit_of(args.before)}); after: this checkout ({commit_of(ROOT)})",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
             f"{threads}; {args.note}",
             f"- per process: the median of {args.updates} updates after one warm-up, as CPU seconds of the process "
             f"(time.process_time: what other processes' load changes least) and wall seconds; {args.rounds} fresh "
             "processes per code, alternating; the table: the median CPU seconds and the least wall seconds over "
             "them", "",
             "| case | before CPU s | after CPU s | after / before | before wall s (least) | after wall s (least) | "
             "per process CPU s (before; after) |",
             "|---|---|---|---|---|---|---|"]
    for case, cpu, wall, seconds in rows:
        per = "; ".join(", ".join(f"{c:.3f}" for _, c in seconds[k]) for k in ("before", "after"))
        lines.append(f"| {case} | {cpu['before']:.3f} | {cpu['after']:.3f} | {cpu['after'] / cpu['before']:.2f} | "
                     f"{wall['before']:.3f} | {wall['after']:.3f} | {per} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="root of the checkout to compare against")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per code and case")
    parser.add_argument("--updates", type=int, default=5, help="timed updates per process")
    parser.add_argument("--note", default="", help="what else the machine was doing, for the results file")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "step.md"))
    main(parser.parse_args())
