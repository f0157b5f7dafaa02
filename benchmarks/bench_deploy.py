"""What deploying a quantized DiT costs next to its full-precision model, each figure from a fresh process.

For a registry model with random weights (or the embedded digits model, `--model embedded`): artifact / checkpoint
bytes, load seconds, peak resident memory (RSS) after loading and after one forward at batch 2 and at batch 32,
forward seconds, for the FP checkpoint, the k-means W2 artifact and that artifact decoded at load (`sample.py
--decode-weights`); plus the RSS of importing torch and the project alone (the baseline the targets are measured
over). On CUDA also the peak CUDA memory, and the quantized model twice more: forced onto the decode path
(VQ4DIT_FUSED=0) and onto the fused Triton kernel (VQ4DIT_FUSED=1, needs triton), beside the automatic choice.

    python benchmarks/bench_deploy.py                      # DiT-XL/2 256 px (artifact ~10 min once, then reused)
    python benchmarks/bench_deploy.py --model embedded --out benchmarks/results/deploy_embedded
    python benchmarks/bench_deploy.py --model DiT-S/8 --image-size 64 --out /tmp/deploy      # smoke test
    python benchmarks/bench_deploy.py --device cuda --precision bf16 --batches 1 16 --out benchmarks/results/deploy_gpu

Weights are N(0, 0.02) (bench_xl.random_checkpoint), so only time and memory mean anything. The checkpoint and the
artifact (`quantize.py --method kmeans --wbits 2 --dim 4`) live in --work and are reused across runs. Each variant
runs in its own process (this file with --probe), which prints one JSON line; peak RSS is getrusage's maximum.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
VARIANTS = ("bare", "fp", "quantized", "decoded")
CUDA_VARIANTS = {"quantized-decode": "0", "quantized-fused": "1"}  # more variants on CUDA: their VQ4DIT_FUSED
# targets of issue 10 (this CPU, DiT-XL/2 W2): bytes added over the bare import by load + forward at batch 2
TARGETS = {"quantized": (1.3, "artifact"), "fp": (1.25, "weights")}  # (factor, of what) + 100 MiB
SLACK = 100 * MiB
# targets of issue 32: quantized forward / FP forward at most this, on the CPU at every batch, on CUDA at the
# largest batch and at batch 1
CPU_TIME_FACTOR, CUDA_TIME_FACTOR, CUDA_BATCH1_FACTOR = 1.0, 1.1, 0.8


def peak_rss():
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def probe(args):
    """One variant in this (fresh) process; prints its measurements as one JSON line."""
    sys.path.insert(0, ROOT)
    import torch

    from vq4dit.models.loading import load_dit
    from vq4dit.utils.precision import apply_precision, resolve_precision
    from vq4dit.vq import load_quantized
    from vq4dit.vq.kernels.decode import workspace_bytes

    cuda = args.device.startswith("cuda")
    out = {"variant": args.probe, "import_rss": peak_rss(), "threads": torch.get_num_threads()}
    if args.probe == "bare":
        print(json.dumps(out))
        return

    def sync():
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    if args.probe == "fp":
        registry = None if args.model == "embedded" else args.model
        model = load_dit(registry, args.ckpt, None if registry is None else args.image_size, device=args.device)[0]
    else:
        model = load_quantized(args.artifact, args.device, decode=args.probe == "decoded")[0]
    precision = resolve_precision(args.precision, args.device)
    model = apply_precision(model, precision, args.device).eval()
    sync()
    out.update(load_s=time.perf_counter() - start, load_rss=peak_rss(), precision=precision.name)
    if cuda:
        out["load_cuda"] = torch.cuda.max_memory_allocated()
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen)
        x = x.to(args.device, precision.dtype)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(args.device)
        y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(args.device)
        times, cpu_times = [], []
        with torch.no_grad():
            for _ in range(1 + args.repeats):  # the first forward is the one the peak memory is read after
                sync()
                begin, cpu_begin = time.perf_counter(), time.process_time()
                model(x, t, y)
                sync()
                times.append(time.perf_counter() - begin)
                cpu_times.append(time.process_time() - cpu_begin)
                if len(times) == 1:
                    out[f"rss_b{batch}"] = peak_rss()
                    if cuda:
                        out[f"cuda_b{batch}"] = torch.cuda.max_memory_allocated()
        out[f"forward_s_b{batch}"] = statistics.median(times[1:] or times)
        out[f"forward_cpu_s_b{batch}"] = statistics.median(cpu_times[1:] or cpu_times)
        out[f"forward_runs_b{batch}"] = times
    out["workspace_bytes"] = workspace_bytes()
    print(json.dumps(out))


def run_probe(variant, args, ckpt, artifact):
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", variant, "--model", args.model,
           "--image-size", str(args.image_size), "--ckpt", ckpt, "--artifact", artifact, "--device", args.device,
           "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
    if args.precision:
        cmd += ["--precision", args.precision]
    env = dict(os.environ)
    if variant in CUDA_VARIANTS:
        env["VQ4DIT_FUSED"] = CUDA_VARIANTS[variant]
    print(f"[bench_deploy] {variant}: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"probe {variant} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_code_artifact(model_name, ckpt, image_size, out_dir, seed=0):
    """A W2 artifact (k256 d4) of the checkpoint whose block Linears get random codebooks and indices instead of
    k-means ones: the same layers, sizes and decode work, made in seconds where k-means takes an hour on a loaded
    CPU (DiT-B/2); for time and memory only."""
    import torch

    from vq4dit.models.loading import load_dit
    from vq4dit.vq.apply import BLOCK_LINEARS, replace_linears
    from vq4dit.vq.artifact import save_quantized
    from vq4dit.vq.layer import VQLinear
    from vq4dit.vq.modelref import reference

    embedded = model_name == "embedded"
    model = load_dit(None if embedded else model_name, ckpt, None if embedded else image_size)[0]
    gen = torch.Generator().manual_seed(seed)

    def make(name, linear):
        layer = VQLinear(linear.in_features, linear.out_features, 256, 4, hard=True)
        with torch.no_grad():
            layer.codebook.copy_(torch.randn(layer.codebook.shape, generator=gen) * 0.02)
            layer.indices.copy_(torch.randint(0, 256, layer.indices.shape, generator=gen))
            layer.bias.copy_(linear.bias)
        return layer

    replace_linears(model, BLOCK_LINEARS, make, progress=False)
    save_quantized(model, reference(model, name=model_name), out_dir, {"method": "random codes (bench_deploy)"})


def work_paths(args):
    """(checkpoint, artifact) paths of this run: the embedded model's file or --work/fp.safetensors, and
    --work/<codes>_w2."""
    sys.path.insert(0, ROOT)
    from vq4dit.utils.resources import EMBEDDED_DIT

    ckpt = EMBEDDED_DIT if args.model == "embedded" else os.path.join(args.work, "fp.safetensors")
    return ckpt, os.path.join(args.work, f"{args.codes}_w2")


def prepare(args):
    """The random FP checkpoint and its W2 artifact in --work, made once and reused. Run in a child process (see
    main): a probe's peak RSS starts from its parent's at the fork, so the parent must not have loaded a model."""
    ckpt, artifact = work_paths(args)  # puts the repository on sys.path
    from benchmarks.bench_xl import random_checkpoint

    os.makedirs(args.work, exist_ok=True)
    if args.model == "embedded":
        model_args = []
    else:
        random_checkpoint(args.model, args.image_size, ckpt)
        model_args = ["--model", args.model, "--ckpt", ckpt, "--image-size", str(args.image_size)]
    if os.path.isfile(os.path.join(artifact, "quant_config.json")):
        return
    if args.codes == "random":
        random_code_artifact(args.model, ckpt, args.image_size, artifact)
        return
    cmd = [sys.executable, "quantize.py", "--method", "kmeans", *model_args, "--wbits", "2", "--dim", "4",
           "--out", artifact, "--device", args.device]
    print(f"[bench_deploy] making the artifact once: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"[bench_deploy] artifact made in {time.perf_counter() - start:.0f} s", flush=True)


def machine(device):
    """One line naming the machine: CPU model and cores, memory, GPU when used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"
    if device.startswith("cuda"):
        import torch

        text += f"; {torch.cuda.get_device_name(device)}"
    return text


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def variants(device):
    """The variants measured on `device`, "bare" first."""
    return VARIANTS + (tuple(CUDA_VARIANTS) if device.startswith("cuda") else ())


def time_ratio(results, variant, batch, cuda):
    """variant's forward seconds over FP's at `batch`: wall seconds on CUDA (synchronised), CPU seconds on a CPU."""
    key = f"forward_s_b{batch}" if cuda else f"forward_cpu_s_b{batch}"
    return results[variant][key] / results["fp"][key]


def targets(results, sizes, batches, cuda):
    """[(text, met)] for the memory targets (smallest batch) and the time targets (issue 32)."""
    base, small = results["bare"]["import_rss"], min(batches)
    rows = []
    for variant, (factor, what) in TARGETS.items():
        added = results[variant][f"rss_b{small}"] - base
        limit = factor * sizes[what] + SLACK
        rows.append((f"{variant} load + forward at batch {small} adds {added / MiB:.0f} MiB over the bare import; "
                     f"target <= {factor} x {what} ({sizes[what] / MiB:.0f} MiB) + 100 MiB = {limit / MiB:.0f} MiB",
                     added <= limit))
    unit = "wall seconds" if cuda else "CPU seconds"
    for batch in batches:
        factor = CPU_TIME_FACTOR if not cuda else CUDA_BATCH1_FACTOR if batch == 1 else CUDA_TIME_FACTOR
        if cuda and batch not in (1, max(batches)):
            continue
        ratio = time_ratio(results, "quantized", batch, cuda)
        rows.append((f"quantized forward at batch {batch} takes {ratio:.2f} x FP in {unit}; target <= {factor} x",
                     ratio <= factor))
    return rows


def report(args, results, sizes, load_before, load_after):
    batches, cuda = args.batches, args.device.startswith("cuda")
    threads = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = f"{threads}python benchmarks/bench_deploy.py" + "".join(f" {a}" for a in sys.argv[1:])
    model = "the embedded digits model" if args.model == "embedded" else f"{args.model} {args.image_size} px"
    weights = "" if args.model == "embedded" else ", random weights"
    codes = "k-means" if args.codes == "kmeans" else "random-code"
    lines = [f"# Deployment cost: {model}{weights}, {codes} W2 (k256 d4)", "",
             f"Command: `{command}`  ", f"Machine: {machine(args.device)}; torch threads "
             f"{results['fp']['threads']}; device {args.device}, precision {results['fp']['precision']}  ",
             f"Code: {git_commit()}; {time.strftime('%Y-%m-%d %H:%M')}  ",
             f"Load average (1 min) before / after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores: "
             "times are affected by other jobs when it exceeds the cores; memory figures are not.", "",
             f"Bare import of torch and the project: {results['bare']['import_rss'] / MiB:.0f} MiB peak RSS. "
             f"FP weights {sizes['weights'] / MiB:.1f} MiB (safetensors), artifact {sizes['artifact'] / MiB:.1f} "
             "MiB (model.safetensors). Memory is peak RSS in MiB (process high-water mark after the step).", ""]
    head = ["variant", "load s", "RSS after load"] + [f"RSS after fwd b{b}" for b in batches]
    head += [f"added over bare, b{batches[0]}", "decode buffer MiB"] + [f"fwd s b{b} wall (CPU)" for b in batches]
    head += [f"quantized / FP b{b}" for b in batches]
    if cuda:
        head += ["CUDA peak after load"] + [f"CUDA peak b{b}" for b in batches]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results["bare"]["import_rss"]
    for variant in variants(args.device)[1:]:
        r = results[variant]
        row = [variant, f"{r['load_s']:.1f}", f"{r['load_rss'] / MiB:.0f}"]
        row += [f"{r[f'rss_b{b}'] / MiB:.0f}" for b in batches]
        row += [f"{(r[f'rss_b{batches[0]}'] - base) / MiB:.0f}", f"{r['workspace_bytes'] / MiB:.1f}"]
        row += [f"{r[f'forward_s_b{b}']:.3f} ({r[f'forward_cpu_s_b{b}']:.3f})" for b in batches]
        row += [f"{time_ratio(results, variant, b, cuda):.2f}" for b in batches]
        if cuda:
            row += [f"{r['load_cuda'] / MiB:.0f}"] + [f"{r[f'cuda_b{b}'] / MiB:.0f}" for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Forward seconds: median of {args.repeats} forwards after the first (the first is the one the "
              "memory is read after), wall and in brackets CPU seconds of the process (all its threads), which other "
              "jobs on the machine disturb far less than wall time; on a CPU the ratios compare CPU seconds, on CUDA "
              "wall seconds. Decode buffer: the workspace every quantized layer decodes into (vq/kernels/decode.py), "
              "held after the forwards.", "", "Targets (memory: issue 10; time: issue 32):", ""]
    lines += [f"- {'met' if met else 'NOT met'}: {text}" for text, met in targets(results, sizes, batches, cuda)]
    return "\n".join(lines) + "\n"


def main(args):
    sys.path.insert(0, ROOT)
    from vq4dit.utils.fileio import write_text_atomic

    ckpt, artifact = work_paths(args)
    if not (os.path.isfile(ckpt) and os.path.isfile(os.path.join(artifact, "quant_config.json"))):
        subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--work", args.work,
                        "--prepare-only"], cwd=ROOT, check=True)
    load_before = os.getloadavg()[0]
    results = {variant: run_probe(variant, args, ckpt, artifact) for variant in variants(args.device)}
    load_after = os.getloadavg()[0]
    sizes = {"weights": os.path.getsize(ckpt), "artifact": os.path.getsize(os.path.join(artifact, "model.safetensors"))}
    text = report(args, results, sizes, load_before, load_after)
    payload = {"command": sys.argv, "model": args.model, "image_size": args.image_size, "device": args.device,
               "machine": machine(args.device), "code": git_commit(), "load_average": [load_before, load_after],
               "sizes": sizes, "results": results,
               "targets": [{"text": t, "met": met}
                           for t, met in targets(results, sizes, args.batches, args.device.startswith("cuda"))]}
    write_text_atomic(args.out + ".md", text)
    write_text_atomic(args.out + ".json", json.dumps(payload, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2", help="registry name (random weights) or embedded")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", default=None, help="fp32 | tf32 | bf16 | fp16 (default: the device's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 32], help="forward batch sizes, ascending")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per batch after the first")
    parser.add_argument("--work", default=None, help="checkpoint + artifact directory, reused "
                                                     "(default outputs/bench_deploy/<model>-<size>)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "deploy"),
                        help="writes OUT.md and OUT.json")
    parser.add_argument("--codes", choices=("kmeans", "random"), default="kmeans",
                        help="the W2 artifact's codes: k-means (quantize.py) or random (seconds; time and memory only)")
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", choices=VARIANTS + tuple(CUDA_VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.probe:
        probe(cli)
    else:
        tag = f"{cli.model.replace('/', '_').lower()}-{cli.image_size}"
        cli.work = cli.work or os.path.join(ROOT, "outputs", "bench_deploy", tag)
        if cli.prepare_only:
            prepare(cli)
        else:
            main(cli)
