"""benchmarks/gpu_check.py's sections on the chip and whole runs: the dense GEMM rate every "% of the chip" refers to
(device), the DiT-XL/2 forward full precision vs W2 (deploy), Flux blocks streamed from the host with and without
the next block staged ahead (stream), quantize.py's plan against a real run's peak (plan) and
2 processes against 1 (ddp). Each section is fn(sizes, device, report), plan and ddp with a timeout for their child
processes too.
"""
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from benchmarks.gpu_measure import SMOKE, median_seconds, peak_gib, reset_peak
from vq4dit.models.dit import DiT_models
from vq4dit.vq.apply import replace_linears
from vq4dit.vq.layer import VQLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # quantize.py's directory: the child runs there


def gemm_tflops(device, n, dtype):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats=10) / 1e12


def section_device(sizes, device, report):
    torch.backends.cuda.matmul.allow_tf32 = False
    report.facts["fp32 GEMM TFLOP/s"] = round(gemm_tflops(device, sizes.gemm, torch.float32), 2)
    report.facts["bf16 GEMM TFLOP/s"] = round(gemm_tflops(device, sizes.gemm, torch.bfloat16), 2)


def hard_random_vq(model, device):
    """Every Linear of the blocks -> a hard W2 VQLinear with random codebook and indices (no k-means)."""
    def make(name, linear):
        layer = VQLinear(linear.in_features, linear.out_features, 256, 4, bias=linear.bias is not None, hard=True,
                         device=device)
        layer.codebook.data.normal_(0, 0.02)
        layer.indices.random_(0, 256)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer

    replace_linears(model, r"^blocks\.", make, progress=False)
    return model


def section_deploy(sizes, device, report):
    torch.manual_seed(0)
    fp = DiT_models[sizes.dit_model](input_size=sizes.dit_input).to(device).eval()
    quantized = hard_random_vq(DiT_models[sizes.dit_model](input_size=sizes.dit_input).to(device).eval(), device)
    for batch in (1, sizes.dit_batch):
        x = torch.randn(batch, 4, sizes.dit_input, sizes.dit_input, device=device)
        t, y = torch.randint(0, 1000, (batch,), device=device), torch.randint(0, 1000, (batch,), device=device)
        for dtype in ("fp32", "bf16"):
            cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
            row = {"batch": batch, "dtype": dtype}
            for name, model in (("FP", fp), ("W2", quantized)):
                reset_peak(device)
                with torch.no_grad(), cast:
                    row[f"{name} ms"] = round(1e3 * median_seconds(lambda: model(x, t, y), device, repeats=10), 2)
                row[f"{name} peak GiB"] = peak_gib(device)
            row["W2 / FP"] = round(row["W2 ms"] / row["FP ms"], 2)
            report.add_row("deploy", row)


STREAM_BLOCKS = 6  # Flux-dev double blocks streamed in the stream section (each 340 M weights, 0.63 GiB in bf16)


class BlockStack(nn.Module):
    """Flux double blocks called in turn on one batch: the teacher forward a streamed record runs, without the rest
    of the model."""

    def __init__(self, blocks, call):
        super().__init__()
        self.blocks, self.call = nn.ModuleList(blocks), call

    def forward(self):
        return [self.call(block) for block in self.blocks]


def section_stream(sizes, device, report):
    """Blocks stored in bf16 on the host, streamed through the device (models.offload.HostBlocks) as a streamed
    record's teacher forward runs them: with the next block's copies staged ahead (the default on a GPU) and
    without, against the same blocks resident in fp32 (no transfer at all); outputs compared bit for bit."""
    from benchmarks.gpu_calib_sections import flux_block, flux_call
    from vq4dit.models.offload import HostBlocks

    count = 2 if sizes is SMOKE else STREAM_BLOCKS
    blocks = [flux_block(sizes, "cpu").to(torch.bfloat16).eval() for _ in range(count)]
    call = flux_call(sizes, 1, device)
    stored = BlockStack(blocks, call)
    resident = BlockStack([copy.deepcopy(b).float().to(device) for b in blocks], call)
    rows, outputs = [], {}
    with torch.no_grad():
        reset_peak(device)
        outputs["resident fp32"] = resident()
        rows.append({"blocks": "resident fp32", "ms per forward": round(1e3 * median_seconds(resident, device, 3), 1),
                     "peak GiB": peak_gib(device)})
        del resident
        for label, stager in (("streamed, staged ahead", "device"), ("streamed, no staging", None)):
            offload = HostBlocks(stored, list(stored.blocks.named_children()), device, stager=stager)
            reset_peak(device)
            outputs[label] = stored()
            seconds = median_seconds(stored, device, 3)
            rows.append({"blocks": label, "ms per forward": round(1e3 * seconds, 1), "peak GiB": peak_gib(device),
                         "moves staged": f"{offload.staged_in} of {offload.moves}"})
            offload.close()
    same = all(torch.equal(a, b) for label in outputs for a, b in zip(outputs[label], outputs["resident fp32"]))
    host = sum(t.nbytes for t in stored.parameters())
    for row in rows:
        row["bf16 GiB per block"] = round(host / count / 2**30, 2)
        report.add_row("stream", row)
    report.facts["stream outputs equal the resident fp32 blocks"] = same


def run_quantize(args, device, timeout):
    """quantize.py on the embedded model in a child process; -> (exit code, seconds, peak device GiB, stderr tail)."""
    probe = ("import runpy, sys, torch; sys.argv = ['quantize.py'] + sys.argv[1:]\n"
             "try:\n    runpy.run_path('quantize.py', run_name='__main__')\nfinally:\n"
             "    print('PEAK', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *args, "--device", device.type], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    peak = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK")]
    return done.returncode, time.perf_counter() - start, int(peak[0]) / 2**30 if peak else None, done.stderr[-400:]


SMALL_RUN = ["--iters", "20", "--calib-samples", "4", "--calib-timesteps", "3", "--steps", "10"]


# the runs of section_plan: unstreamed, streamed (--stream on: the teacher on the host, one block on the device at a
# time), an unstreamed run with a bf16 step (the plan's autocast stand-in, jobs.meta_peak.PlannedAutocast, against
# CUDA's autocast), and a streamed --bits allocation by blocks (its noise probes on resident blocks; the plan does
# not count the probes) with the end-to-end pass (whose points the plan counts)
PLAN_RUNS = {"off": ["--stream", "off"], "on": ["--stream", "on"],
             "off, --step-dtype bf16 (autocast's CUDA lists)": ["--stream", "off", "--step-dtype", "bf16"],
             "on, --bits 1.5 --bits-probe block --e2e-iters 20": ["--stream", "on", "--bits", "1.5", "--bits-probe",
                                                                  "block", "--e2e-iters", "20"]}


def section_plan(sizes, device, report, timeout):
    """The plan's device peak against a real run's max_memory_allocated (PLAN_RUNS)."""
    with tempfile.TemporaryDirectory() as tmp:
        for n, (label, extra) in enumerate(PLAN_RUNS.items()):
            plan_file = os.path.join(tmp, f"plan-{n}.json")
            flags = [*SMALL_RUN, *extra]
            subprocess.run([sys.executable, "quantize.py", *flags, "--device", device.type, "--dry-run", "--json",
                            plan_file], cwd=ROOT, check=True, capture_output=True, timeout=timeout)
            with open(plan_file) as f:
                planned = json.load(f).get("device_peak_bytes")
            code, seconds, peak, err = run_quantize([*flags, "--out", os.path.join(tmp, str(n))], device, timeout)
            report.add_row("plan", {"run": f"embedded, small budget, --stream {label}", "exit": code,
                                    "s": round(seconds, 1),
                                    "measured device GiB": None if peak is None else round(peak, 3),
                                    "planned device GiB": None if planned is None else round(planned / 2**30, 3),
                                    "stderr tail": err.strip().splitlines()[-1] if code else ""})


def section_ddp(sizes, device, report, timeout):
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        report.facts["ddp"] = "skipped: fewer than 2 GPUs"
        return
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            start = time.perf_counter()
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "quantize.py",
                       *SMALL_RUN, "--e2e-iters", "20", "--device", "cuda", "--out", os.path.join(tmp, str(procs))]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            report.add_row("ddp", {"processes": procs, "exit": done.returncode,
                                   "s": round(time.perf_counter() - start, 1)})


