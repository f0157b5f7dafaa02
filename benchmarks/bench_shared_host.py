"""Host memory of one machine under torchrun, measured against the plan: the streamed teacher's checkpoint pages are
held once, however many processes map them, and rank 0 alone holds the text encoders.

A Flux pipeline with the tests' tiny text encoders and VAE (tests/models/tiny_t2i.py) and a transformer of real
head width (8 heads of 128, 2 double and 4 single blocks: 146 M weights, 279 MiB in bf16), random weights, stored in
bf16 as Flux's checkpoints are. `quantize.py --stream on` runs it on the CPU in 2 torchrun processes (1 thread
each, a small budget) while this script reads every process's /proc/PID/smaps_rollup every 0.1 s: the machine's
memory is the sum of the processes' proportional set sizes (Pss: a page mapped by both counts half in each), each
process's RSS counts the mapped pages whole. Beside it, the plan of the same run (`--dry-run --json`, with
WORLD_SIZE=2 LOCAL_WORLD_SIZE=2) and what the plan said before the pages were counted once (2 x one process's host
peak).

    python benchmarks/bench_shared_host.py        # writes benchmarks/results/shared_host.{md,json}
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vq4dit.utils.host_memory import memory_split  # noqa: E402

# the text widths are the tiny encoders'
MID = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=128,
           num_attention_heads=8, joint_attention_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
BUDGET = ["--height", "8", "--width", "8", "--codebook-size", "16", "--kmeans-iters", "2", "--iters", "2",
          "--calib-samples", "4", "--calib-timesteps", "2", "--steps", "2", "--batch-size", "4", "--device", "cpu",
          "--stream", "on"]
MIB = 2**20
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def build_pipeline(path):
    """The pipeline (tiny encoders and VAE, the MID transformer in bf16) saved at `path`; its transformer's weights."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from tests.models.tiny_t2i import HIDDEN, flux_pipeline

    tiny = flux_pipeline()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**MID, pooled_projection_dim=HIDDEN).to(torch.bfloat16)
    parts = {k: getattr(tiny, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                           "tokenizer_2")}
    FluxPipeline(transformer=transformer, **parts).save_pretrained(str(path), safe_serialization=True)
    return sum(p.numel() for p in transformer.parameters())


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def watch(command, env):
    """Run `command`; (exit code, wall s, peak of the workers' summed Pss, {worker: peak Rss}, {worker: peak
    private}); the workers are the launcher's child processes."""
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, machine, rss, private = time.time(), 0, {}, {}
    while run.poll() is None:
        sizes = {pid: memory_split(pid) for pid in children(run.pid)}
        sizes = {pid: s for pid, s in sizes.items() if s}  # {}: the process has gone
        machine = max(machine, sum(s["pss"] for s in sizes.values()))
        for pid, s in sizes.items():
            rss[pid], private[pid] = max(rss.get(pid, 0), s["rss"]), max(private.get(pid, 0), s["private"])
        time.sleep(0.1)
    if run.returncode:
        print(run.stderr.read()[-3000:], file=sys.stderr)
    return run.returncode, time.time() - start, machine, rss, private


def plan(pipeline, processes, work):
    path = work / f"plan{processes}.json"
    env = {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)}
    subprocess.run([sys.executable, os.path.join(ROOT, "quantize.py"), "--ckpt", str(pipeline), *BUDGET,
                    "--dry-run", "--json", str(path)], env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def main(args):
    from vq4dit.utils.fileio import write_text_atomic

    work = Path(args.work or tempfile.mkdtemp(prefix="vq4dit_shared_host_"))
    pipeline = work / "pipeline"
    weights = build_pipeline(pipeline) if not pipeline.exists() else None
    one, two = plan(pipeline, 1, work), plan(pipeline, 2, work)
    runs = {}
    for label, extra in ALLOCATORS.items():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.join(ROOT, "quantize.py"), "--ckpt", str(pipeline), *BUDGET, "--out", str(work / "out"),
                   "--overwrite"]
        code, wall, machine, rss, private = watch(command, env)
        runs[label] = {"exit": code, "wall_s": wall, "machine_pss_peak": machine, "rss_peaks": sorted(rss.values()),
                       "private_peaks": sorted(private.values())}
    result = {"command": sys.argv, "weights": weights, "runs": runs,
              "plan_one_process_host_peak": one["host_peak_bytes"],
              "plan_per_process_host_peak": two["host_peak_bytes"],
              "plan_machine_peak": two["machine_host_peak_bytes"], "plan_machine_stage": two["machine_host_peak_stage"],
              "plan_before": 2 * two["host_peak_bytes"], "load_average": os.getloadavg()[0]}

    def mib(values):
        return " / ".join(f"{v / MIB:.0f}" for v in values)

    lines = ["# One machine's host memory under torchrun: measured against the plan", "",
             f"Command: `python benchmarks/bench_shared_host.py`; {time.strftime('%Y-%m-%d %H:%M')}; load average "
             f"{result['load_average']:.1f} on {os.cpu_count()} cores", "",
             "2 torchrun processes (CPU, 1 thread each), `--stream on`, a Flux transformer of 146 M weights stored in "
             "bf16 (279 MiB) with tiny text encoders. MiB. The run once with glibc's default allocator, which keeps "
             "freed heap memory for reuse, and once with `MALLOC_MMAP_THRESHOLD_=65536` (blocks of 64 KiB or more "
             "go back to the system when freed: the process's memory is then its live tensors).", "",
             "| | " + " | ".join(ALLOCATORS) + " |", "|---|" + "---|" * len(ALLOCATORS),
             "| measured: the machine (sum of the processes' Pss), peak | "
             + " | ".join(f"{r['machine_pss_peak'] / MIB:.0f}" for r in runs.values()) + " |",
             "| measured: each process's RSS peak (mapped pages counted whole) | "
             + " | ".join(mib(r["rss_peaks"]) for r in runs.values()) + " |",
             "| measured: each process's private peak | "
             + " | ".join(mib(r["private_peaks"]) for r in runs.values()) + " |",
             "| quantize.py exit status, wall s | "
             + " | ".join(f"{r['exit']}, {r['wall_s']:.0f}" for r in runs.values()) + " |", "",
             "| plan | MiB |", "|---|---|",
             f"| one process's host peak (the largest process) | {two['host_peak_bytes'] / MIB:.0f} |",
             f"| the machine, pages and text encoders once ({two['machine_host_peak_stage']}) | "
             f"{two['machine_host_peak_bytes'] / MIB:.0f} |",
             f"| before: 2 x one process's host peak | {2 * two['host_peak_bytes'] / MIB:.0f} |"]
    write_text_atomic(args.out + ".md", "\n".join(lines) + "\n")
    write_text_atomic(args.out + ".json", json.dumps(result, indent=1) + "\n")
    print("\n".join(lines))
    return max(r["exit"] for r in runs.values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="directory for the pipeline, plans and artifact (default: a new temporary one)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "shared_host"))
    sys.exit(main(parser.parse_args()))
