"""Data-parallel calibration: quantize.py under torchrun with N processes x 1 thread against 1 process x 1 thread
on the embedded model, or a registry DiT with random weights (--model), fresh processes, run alternately. Writes a
markdown table (default benchmarks/results/ddp.md).

The stages are timed from the runs' own log lines: load -> k-means ("quantized N linear layers"), recording
("recorded N calibration points"), the block-wise walk (to the last "block" line) and the whole command; and the
CPU time of the whole command (every process).

    python benchmarks/bench_ddp.py                       # 2 processes, the budget below
    python benchmarks/bench_ddp.py --repeats 3 --iters 200
    python benchmarks/bench_ddp.py --model DiT-S/2 --image-size 256 --iters 10   # DiT-XL/2's 256 tokens, 384 wide

Why another model: what each process repeats at every update (the soft weights, their backward, the optimizer step,
the all-reduce) grows with the number of weights, what it splits (the rows of the minibatch through the block) with
the weights times the minibatch's tokens: the embedded model's blocks see 64 tokens per sample, DiT-XL/2's 256.
"""
import argparse
import datetime
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vq4dit.utils.fileio import write_text_atomic  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\S+) (.*)$")
MARKS = {"loaded": r"^loaded ", "kmeans": r"^quantized \d+ linear layers", "recorded": r"^recorded \d+ calibration",
         "walked": r"^block \d+ \("}


def stamp(text):
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def stage_times(log):
    """{mark: the last time any rank logged it} from a run's log text."""
    last = {}
    for line in log.splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        for mark, pattern in MARKS.items():
            if re.search(pattern, m.group(3)):
                last[mark] = max(last.get(mark, 0.0), stamp(m.group(1)))
    return last


def cpu_seconds():
    """User + system CPU time of this process's finished children (every rank, and torchrun's agent)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def model_flags(model, image_size, work):
    """(quantize.py flags, a description) of the model a run calibrates: "embedded" (the default, no flags) or a
    registry name whose random-weight checkpoint (N(0, 0.02), benchmarks/bench_xl.random_checkpoint) is written
    under `work` once."""
    if model == "embedded":
        return [], "Embedded model (DiT-Digits/2, 6 blocks, 30 Linears, 128 wide, 64 tokens)"
    from benchmarks.bench_xl import random_checkpoint

    name = f"{model.replace('/', '-')}-{image_size}.safetensors"
    ckpt = random_checkpoint(model, image_size, os.path.join(work, name))
    tokens = (image_size // 8 // int(model.rsplit("/", 1)[1])) ** 2
    return (["--model", model, "--ckpt", ckpt, "--image-size", str(image_size)],
            f"{model} at {image_size} px with random weights ({tokens} tokens)")


def run(processes, flags, out):
    """One quantize.py run: {"total", "kmeans", "record", "walk"} in wall seconds, "cpu" in CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    start, cpu = time.perf_counter(), cpu_seconds()
    done = subprocess.run([*launcher, "quantize.py", "--out", out, *flags], cwd=REPO, env=env, capture_output=True,
                          text=True)
    total, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    if done.returncode:
        raise SystemExit(f"run with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    t = stage_times(done.stderr)
    return {"total": total, "kmeans": t["kmeans"] - t["loaded"], "record": t["recorded"] - t["kmeans"],
            "walk": t["walked"] - t["recorded"], "cpu": cpu}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-timesteps", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--extra", default="", help="more quantize.py flags, e.g. '--codebook-init kmeans'")
    p.add_argument("--model", default="embedded", help="embedded, or a registry name (random weights), e.g. DiT-S/2")
    p.add_argument("--image-size", type=int, default=256, help="with --model NAME")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "ddp.md"))
    args = p.parse_args()
    flags = ["--iters", str(args.iters), "--calib-samples", str(args.calib_samples), "--calib-timesteps",
             str(args.calib_timesteps), "--steps", str(args.steps), "--kmeans-iters", str(args.kmeans_iters),
             *args.extra.split()]
    times = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        model_args, described = model_flags(args.model, args.image_size, tmp)
        for r in range(args.repeats):
            for n in times:  # alternately, so that a change of the machine's load hits both
                times[n].append(run(n, flags + model_args, os.path.join(tmp, f"n{n}-{r}")))
                print(n, "process(es):", {k: round(v, 1) for k, v in times[n][-1].items()}, flush=True)
    med = {n: {k: statistics.median(t[k] for t in runs) for k in runs[0]} for n, runs in times.items()}
    load = os.getloadavg()
    lines = [
        "# Data-parallel calibration: quantize.py under torchrun (gloo, CPU)", "",
        f"Command: `python benchmarks/bench_ddp.py --processes {args.processes} --repeats {args.repeats} --iters "
        f"{args.iters} --calib-samples {args.calib_samples} --calib-timesteps {args.calib_timesteps} --steps "
        f"{args.steps} --kmeans-iters {args.kmeans_iters}" + (f" --extra '{args.extra}'" if args.extra else "")
        + ("" if args.model == "embedded" else f" --model {args.model} --image-size {args.image_size}") + "`",
        "",
        f"{described}, quantize.py flags `{' '.join(flags)}`; every process "
        f"OMP_NUM_THREADS=1; fresh processes, 1 and {args.processes} processes alternately, median of "
        f"{args.repeats}. Machine: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min) when the table was written: the cores are shared with other jobs, so the "
        "wall-clock ratios are what this machine gave, not what idle cores give. `cpu` is the CPU time of the whole "
        "command, every process together: the work, which the load does not change much; divided by the number of "
        "processes it estimates the wall time on as many idle cores (the processes wait for each other at every "
        "update: for the busiest one's rows before 2026-12-05, for about B / N rows each since).", "",
        f"| stage | 1 process (s) | {args.processes} processes (s) | ratio |", "|---|---|---|---|"]
    for k in ("kmeans", "record", "walk", "total", "cpu"):
        lines.append(f"| {k} | {med[1][k]:.1f} | {med[args.processes][k]:.1f} | "
                     f"{med[args.processes][k] / med[1][k]:.2f}x |")
    per_core = {n: med[n]["cpu"] / n for n in med}
    lines.append(f"| cpu / processes | {per_core[1]:.1f} | {per_core[args.processes]:.1f} | "
                 f"{per_core[args.processes] / per_core[1]:.2f}x |")
    lines += ["", "Runs (seconds):", ""]
    for n, runs in times.items():
        for t in runs:
            lines.append(f"- {n} process(es): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
