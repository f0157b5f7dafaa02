"""Images per second of the whole `sample.py`, full precision against W2 and W3 artifacts (issue 32): each run a
fresh process, the variants in turn (FP, W2, W3, FP, W2, W3, ...) so that a change of the machine's load hits
every variant alike; on every device given, CUDA added when torch sees a GPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_sample_speed.py      # embedded digits model: CPU (+ CUDA if present)
    python benchmarks/bench_sample_speed.py --model DiT-XL/2 --devices cuda --num-samples 64 \\
        --out benchmarks/results/sample_speed_xl                      # random weights at real width, on a GPU
    python benchmarks/bench_sample_speed.py --smoke                  # seconds: 4 samples, 2 steps, one round

W2 is the k-means artifact `quantize.py --method kmeans --wbits 2 --dim 4` (k256 d4), W3 `--wbits 3 --dim 2`
(k64 d2): the same layers, sizes and decode work as a calibrated artifact of that setting. They are made once in
--work and reused. Per run: the whole process's wall and CPU seconds (/usr/bin/time: imports, load, sampling,
saving) and the job's own seconds (sample_to_dir's log line: sampling and saving, after the load); images/s =
samples / job seconds and samples / process wall seconds. Medians over --repeats rounds. Writes OUT.md, OUT.json.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_quality import cpu_seconds, time_lines  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402

VARIANTS = {"fp": [], "w2": ["--wbits", "2", "--dim", "4"], "w3": ["--wbits", "3", "--dim", "2"]}  # quantize flags
JOB_LINE = re.compile(r"wrote (\d+) samples to .* in ([0-9.]+) s")


def devices(requested, cuda_available):
    """The devices to measure: `requested` (a list) or, when None, the CPU and CUDA too when a GPU is present."""
    return requested if requested else ["cpu"] + (["cuda"] if cuda_available else [])


def model_flags(model, ckpt, image_size):
    """quantize.py / FP sample.py flags naming the model: none for the embedded digits model."""
    return [] if model == "embedded" else ["--model", model, "--ckpt", ckpt, "--image-size", str(image_size)]


def random_vae(path):
    """An AutoencoderKL of sd-vae-ft's shape with its initial random weights, saved at `path` once: a latent DiT's
    sample.py decodes through a VAE, and the GPU machine reaches no hub (time only; the images mean nothing)."""
    if not os.path.isdir(path):
        from diffusers import AutoencoderKL

        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      sample_size=256).save_pretrained(path)
    return path


def sample_command(variant, device, artifacts, model_args, args, out_dir):
    """The sample.py command of one run (a quantized variant samples its artifact; FP the model itself)."""
    source = model_args if variant == "fp" else ["--quantized", artifacts[variant]]
    vae = ["--vae", args.vae] if args.vae else []
    return [sys.executable, "sample.py", *source, *vae, "--num-samples", str(args.num_samples),
            "--steps", str(args.steps), "--seed", "0", "--batch-size", str(args.batch_size), "--device", device,
            "--out", out_dir]


def job_seconds(log_path):
    """(samples, seconds) of sample_to_dir's "wrote N samples to DIR in S s" line in a sample.py log."""
    with open(log_path) as f:
        found = [JOB_LINE.search(line) for line in f]
    match = next((m for m in reversed(found) if m), None)
    if match is None:
        raise SystemExit(f"{log_path}: no 'wrote N samples ... in S s' line; sample.py failed? See the log.")
    return int(match[1]), float(match[2])


def prepare(args, model_args):
    """{variant: artifact dir} of the quantized variants, made in --work once (k-means, no calibration)."""
    artifacts = {}
    for variant, flags in VARIANTS.items():
        if not flags:
            continue
        artifacts[variant] = os.path.join(args.work, variant)
        if not os.path.isfile(os.path.join(artifacts[variant], "quant_config.json")):
            steps = ["--kmeans-iters", "2"] if args.smoke else []
            subprocess.run([sys.executable, "quantize.py", *model_args, "--method", "kmeans", *flags, *steps,
                            "--out", artifacts[variant], "--device", args.quantize_device], cwd=ROOT, check=True)
    return artifacts


def run(cmd, log_path):
    """One sample.py process under /usr/bin/time: {wall_s, cpu_s, job_s, samples}."""
    with open(log_path, "w") as log:
        subprocess.run(["/usr/bin/time", "-f", "TIME %e %M %U %S", *cmd], cwd=ROOT, stdout=log, stderr=log,
                       check=True)
    (wall, _), = time_lines(log_path)
    samples, job = job_seconds(log_path)
    return {"wall_s": wall, "cpu_s": cpu_seconds(log_path), "job_s": job, "samples": samples}


def main(args):
    import torch

    os.makedirs(os.path.join(args.work, "samples"), exist_ok=True)
    ckpt = os.path.join(args.work, "fp.safetensors")
    if args.model != "embedded":
        from benchmarks.bench_xl import random_checkpoint

        random_checkpoint(args.model, args.image_size, ckpt)
        args.vae = args.vae or random_vae(os.path.join(args.work, "vae"))
    model_args = model_flags(args.model, ckpt, args.image_size)
    artifacts = prepare(args, model_args)
    runs = {}  # (device, variant) -> [run]
    for device in devices(args.devices, torch.cuda.is_available()):
        for r in range(args.repeats):
            for variant in VARIANTS:
                out_dir = os.path.join(args.work, "samples", f"{device.replace(':', '')}-{variant}-{r}")
                cmd = sample_command(variant, device, artifacts, model_args, args, out_dir)
                runs.setdefault(f"{device} {variant}", []).append(run(cmd + ["--overwrite"], out_dir + ".log"))
    write_report(args, runs)


def write_report(args, runs):
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    model = "the embedded digits model" if args.model == "embedded" else f"{args.model} {args.image_size} px " \
                                                                          "(random weights)"
    lines = [f"# sample.py images per second: {model}, FP vs W2 (k256 d4) vs W3 (k64 d2)", "",
             f"Command: `OMP_NUM_THREADS={threads} python benchmarks/bench_sample_speed.py"
             f"{''.join(' ' + a for a in sys.argv[1:])}`; {args.num_samples} samples, {args.steps} steps, CFG 1.5, "
             f"batch {args.batch_size}; fresh processes in turn, {args.repeats} rounds, medians; load average "
             f"(1 min) at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             "| device | variant | images/s (job) | images/s (whole process) | job s | process wall s "
             "| process CPU s |",
             "|---|---|---|---|---|---|---|"]
    for key, rs in runs.items():
        job = statistics.median(r["job_s"] for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        device, variant = key.split(" ")
        lines.append(f"| {device} | {variant} | {args.num_samples / job:.2f} | {args.num_samples / wall:.2f} | "
                     f"{job:.1f} | {wall:.1f} | {cpu:.1f} |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out + ".md", text)
    write_text_atomic(args.out + ".json", json.dumps({"command": sys.argv, "runs": runs}, indent=1) + "\n")
    print(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded, or a registry name (random weights)")
    parser.add_argument("--image-size", type=int, default=256, help="with a registry --model")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when a GPU is present")
    parser.add_argument("--vae", default=None, help="a local AutoencoderKL directory for a latent registry --model "
                                                    "(default: one with random weights, made in --work)")
    parser.add_argument("--quantize-device", default="cpu", help="where the W2 / W3 artifacts are made (once)")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of FP, W2, W3")
    parser.add_argument("--work", default=None, help="artifacts and samples (default outputs/sample_speed/<model>)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sample_speed"),
                        help="writes OUT.md and OUT.json")
    parser.add_argument("--smoke", action="store_true", help="4 samples, 2 steps, one round, under /tmp")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_samples, args.steps, args.batch_size, args.repeats = 4, 2, 4, 1
        args.out = args.out if "--out" in (argv or sys.argv) else "/tmp/vq4dit_sample_speed_smoke"
    tag = args.model.replace("/", "_").lower() + ("-smoke" if args.smoke else "")
    args.work = args.work or os.path.join(ROOT, "outputs", "sample_speed", tag)
    return args


if __name__ == "__main__":
    main(parse_args())
