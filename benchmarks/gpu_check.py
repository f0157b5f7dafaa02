"""What only a GPU shows, in one command (issue 31 item 6, issue 32 item 4): <= 8 minutes on one GPU.

    python benchmarks/gpu_check.py            # on a GPU: writes benchmarks/results/gpu.md and gpu.json
    python benchmarks/gpu_check.py --smoke    # on a CPU, tiny widths: every section runs (checks the script)

Sections, in order, each skipped when too little of the time budget is left, the results file rewritten after each:
- device: measured dense GEMM TFLOP/s in fp32 (TF32 off) and bf16, the reference for "% of the chip".
- flux_step: one Flux-dev double block at full width (3072 wide, 24 heads, 4096 image + 512 text tokens), random
  weights, its Linears soft VQ (k 256, d 4, n 2): one calibration update (forward, MSE, backward, the Trainer's
  RMSprop step) at batch 1 and 4, fp32 and bf16 autocast: seconds, peak memory, FLOPs counted by
  torch.utils.flop_counter, achieved TFLOP/s and % of the measured bf16 GEMM rate.
  Each update row also says whether an update ran without a host synchronisation (torch.cuda.set_sync_debug_mode
  "error" around one update between selections), and the batch-4 rows are repeated with --micro-batch 1 (gradient
  accumulation: the peak memory it bounds, the time it costs).
- dit_step: the same for one DiT-XL/2 block (1152 wide, 256 tokens) at batch 16, and the implied time per block at
  the default 500 updates.
- soft_weight: one Flux-dev-shaped soft layer (12288 x 3072, k 256, d 4, n 2): its weight's forward and backward in
  the one-pass form (the GPU's, vq.candidates._SoftWeight; its codebook gradient by index_add, the default, and by
  sorted sums, no atomics) against einsum's (the CPU's), ms and peak memory.
- kmeans: the codebook fit (VQLinear.from_linear: k-means + candidate sets) of one Linear of every distinct shape
  of Flux-dev's blocks, and the total over all its block Linears (shapes counted on a meta-device model); and one
  3072 x 3072 fit with the GPU's large distance blocks (vq.nearest.chunk_rows) against 4096-row ones.
- deploy: DiT-XL/2 forward, full precision vs hard W2 VQ layers (random codebooks and indices: decode speed does
  not depend on the values) at batch 1 and 16, fp32 and bf16, with peak memory.
- plan: `quantize.py --dry-run --json` for the embedded model on this device against a real run's
  torch.cuda.max_memory_allocated, with --stream off and on (the streamed path on CUDA: host teacher, blocks moved
  in and upcast, the student built block by block).
- ddp: with 2 or more GPUs, the embedded model quantized by 2 processes under torchrun against 1.
"""
import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vq4dit.calib.config import CalibConfig  # noqa: E402
from vq4dit.calib.micro import micro_losses  # noqa: E402
from vq4dit.calib.train import Trainer  # noqa: E402
from vq4dit.models.dit import DiT_models, DiTBlock  # noqa: E402
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402
from vq4dit.vq import candidates, nearest  # noqa: E402
from vq4dit.vq.apply import quantize_linears, replace_linears  # noqa: E402
from vq4dit.vq.layer import CodebookSpec, VQLinear  # noqa: E402

W2 = CodebookSpec(codebook_size=256, dim=4, candidates=2, kmeans_iters=100)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)


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


def gemm_tflops(device, n, dtype):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats=10) / 1e12


def section_device(sizes, device, report):
    torch.backends.cuda.matmul.allow_tf32 = False
    report.facts["fp32 GEMM TFLOP/s"] = round(gemm_tflops(device, sizes.gemm, torch.float32), 2)
    report.facts["bf16 GEMM TFLOP/s"] = round(gemm_tflops(device, sizes.gemm, torch.bfloat16), 2)


def flux_block(sizes, device):
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    return FluxTransformerBlock(sizes.flux_dim, sizes.flux_heads, sizes.flux_dim // sizes.flux_heads).to(device)


def flux_call(sizes, batch, device):
    """(block -> the block's outputs (B, T_text + T_image, D)) on random inputs of `batch` rows."""
    head = sizes.flux_dim // sizes.flux_heads
    tokens = sizes.flux_text_tokens + sizes.flux_image_tokens
    hidden = torch.randn(batch, sizes.flux_image_tokens, sizes.flux_dim, device=device)
    text = torch.randn(batch, sizes.flux_text_tokens, sizes.flux_dim, device=device)
    temb = torch.randn(batch, sizes.flux_dim, device=device)
    angles = torch.randn(tokens, head, device=device)
    rotary = (angles.cos(), angles.sin())

    def call(block, rows=slice(None)):
        text_out, image_out = block(hidden_states=hidden[rows], encoder_hidden_states=text[rows], temb=temb[rows],
                                    image_rotary_emb=rotary)
        return torch.cat([text_out, image_out], dim=1)

    return call


def dit_call(sizes, batch, device):
    x = torch.randn(batch, sizes.dit_tokens, sizes.dit_hidden, device=device)
    c = torch.randn(batch, sizes.dit_hidden, device=device)
    return lambda block, rows=slice(None): block(x[rows], c[rows])


def syncs_in(update, device):
    """"none" when update() runs without a host synchronisation (CUDA's sync debug mode raises at the first one),
    else the first one's message; "n/a" off CUDA."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        update()
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def update_row(name, block, call, device, dtype, batch, micro_batch=None):
    """One calibration update of `block` (soft VQ Linears): forward under autocast `dtype`, MSE to a fixed target,
    the Trainer's backward and RMSprop step (micro_batch: the `batch` rows in micro-batches of that many, gradients
    accumulated). -> row of seconds, peak GiB, FLOPs, TFLOP/s, host synchronisations inside an update."""
    layers = [m for m in block.modules() if isinstance(m, VQLinear)]
    trainer = Trainer(layers, CalibConfig(select_every=10 ** 6))  # no selection: every update the same work
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.no_grad(), autocast:
        target = call(block).float()

    def loss_fn(rows):
        with autocast:
            out = call(block, rows)
        return nn.functional.mse_loss(out.float(), target[rows])

    def update():
        if micro_batch is None:
            trainer.step(loss_fn(slice(None)))
        else:
            trainer.step(micro_losses(loss_fn, torch.arange(batch, device=device), micro_batch))

    with FlopCounterMode(display=False) as counter:
        with autocast:
            nn.functional.mse_loss(call(block).float(), target).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    reset_peak(device)
    seconds = median_seconds(update, device, repeats=5)
    flops = counter.get_total_flops()
    return {"case": name, "dtype": dtype, "micro-batch": micro_batch or "", "s/update": round(seconds, 4),
            "peak GiB": peak_gib(device), "GFLOP/update": float(f"{flops / 1e9:.3g}"),
            "TFLOP/s": float(f"{flops / seconds / 1e12:.3g}"), "host syncs in an update": syncs_in(update, device)}


def soft_block(block, sizes):
    spec = dataclasses.replace(W2, kmeans_iters=sizes.kmeans_iters)
    quantize_linears(block, spec, include=r".", progress=False)
    return block


def section_flux_step(sizes, device, report):
    block = soft_block(flux_block(sizes, device), sizes)
    for batch in sizes.flux_batches:
        call = flux_call(sizes, batch, device)
        for dtype in ("fp32", "bf16"):
            for micro in (None, 1) if batch == max(sizes.flux_batches) else (None,):
                row = update_row("Flux-dev double block", block, call, device, dtype, batch, micro)
                report.add_row("flux_step", {"batch": batch, **row})
    del block


def section_dit_step(sizes, device, report):
    torch.manual_seed(0)
    block = soft_block(DiTBlock(sizes.dit_hidden, sizes.dit_heads).to(device), sizes)
    call = dit_call(sizes, sizes.dit_batch, device)
    for dtype in ("fp32", "bf16"):
        row = update_row(f"{sizes.dit_model} block", block, call, device, dtype, sizes.dit_batch)
        row["s/block at 500 updates"] = round(500 * row["s/update"], 1)
        report.add_row("dit_step", {"batch": sizes.dit_batch, **row})


def section_soft_weight(sizes, device, report):
    torch.manual_seed(0)
    out, inp = 4 * sizes.flux_dim, sizes.flux_dim
    n_sub = out * inp // W2.dim
    codebook = torch.randn(1, W2.codebook_size, W2.dim, device=device, requires_grad=True)
    cands = torch.randint(0, W2.codebook_size, (n_sub, W2.candidates), device=device, dtype=torch.uint8)
    logits = torch.randn(n_sub, W2.candidates, device=device, requires_grad=True)
    upstream = torch.randn(n_sub, W2.dim, device=device)
    results = {}
    forms = (("einsum (before)", False, "index_add"), ("one pass, codebook grad by index_add", True, "index_add"),
             ("one pass, codebook grad by sorted sums", True, "sorted"))
    for form, one_pass, method in forms:
        def forward_backward(one_pass=one_pass, method=method):
            w = candidates.soft_reconstruct(codebook, cands, torch.softmax(logits, 1), one_pass, method)
            (w * upstream).sum().backward()
            return w

        reset_peak(device)
        ms = 1e3 * median_seconds(forward_backward, device, repeats=10)
        codebook.grad = logits.grad = None
        results[form] = forward_backward().detach(), codebook.grad.clone(), logits.grad.clone()
        codebook.grad = logits.grad = None
        report.add_row("soft_weight", {"layer": f"{out} x {inp}", "form": form, "fwd+bwd ms": round(ms, 2),
                                       "peak GiB": peak_gib(device)})
    before = results.pop(forms[0][0])
    for form, after in results.items():
        report.facts[f"soft weight, {form} vs einsum: largest relative difference (weight, codebook grad, ratio "
                     "grad)"] = [float(f"{((a - b).abs().max() / b.abs().max()).item():.2g}")
                                 for a, b in zip(after, before)]


def flux_block_shapes(sizes):
    """{(out, in): count} over the Linears of Flux-dev's blocks (meta device; the smoke run scales the width)."""
    from diffusers import FluxTransformer2DModel

    config = dict(FLUX_DEV)
    if sizes is SMOKE:
        config.update(num_layers=2, num_single_layers=2, attention_head_dim=sizes.flux_dim // sizes.flux_heads,
                      num_attention_heads=sizes.flux_heads, joint_attention_dim=32, pooled_projection_dim=16)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "transformer_blocks." in name:
            shapes[(m.out_features, m.in_features)] = shapes.get((m.out_features, m.in_features), 0) + 1
    return shapes


def section_kmeans(sizes, device, report):
    spec = dataclasses.replace(W2, kmeans_iters=sizes.kmeans_iters)
    total = 0.0
    for (out, inp), count in sorted(flux_block_shapes(sizes).items()):
        linear = nn.Linear(inp, out, device=device)
        sync(device)
        start = time.perf_counter()
        VQLinear.from_linear(linear, spec, soft=True)
        sync(device)
        seconds = time.perf_counter() - start
        total += count * seconds
        report.add_row("kmeans", {"shape (out, in)": f"{out} x {inp}", "layers": count, "s/layer": round(seconds, 2),
                                  "s total": round(count * seconds, 1)})
    report.facts["k-means + candidates, all Flux-dev block Linears (s)"] = round(total, 1)
    linear = nn.Linear(sizes.flux_dim, sizes.flux_dim, device=device)
    default = nearest.GPU_CHUNK_ELEMENTS
    for label, elements in (("4096-row blocks (before)", 0), ("large blocks", default)):
        nearest.GPU_CHUNK_ELEMENTS = elements
        try:
            sync(device)
            start = time.perf_counter()
            VQLinear.from_linear(linear, spec, soft=True)
            sync(device)
        finally:
            nearest.GPU_CHUNK_ELEMENTS = default
        report.add_row("kmeans_blocks", {"shape (out, in)": f"{sizes.flux_dim} x {sizes.flux_dim}",
                                         "distance blocks": label, "s/layer": round(time.perf_counter() - start, 2)})


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


def section_plan(sizes, device, report, timeout):
    """The plan's device peak against a real run's max_memory_allocated, unstreamed and streamed (--stream on: the
    teacher on the host, one block on the device at a time)."""
    with tempfile.TemporaryDirectory() as tmp:
        for stream in ("off", "on"):
            plan_file = os.path.join(tmp, f"plan-{stream}.json")
            flags = [*SMALL_RUN, "--stream", stream]
            subprocess.run([sys.executable, "quantize.py", *flags, "--device", device.type, "--dry-run", "--json",
                            plan_file], cwd=ROOT, check=True, capture_output=True, timeout=timeout)
            with open(plan_file) as f:
                planned = json.load(f).get("device_peak_bytes")
            code, seconds, peak, err = run_quantize([*flags, "--out", os.path.join(tmp, stream)], device, timeout)
            report.add_row("plan", {"run": f"embedded, small budget, --stream {stream}", "exit": code,
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
                       *SMALL_RUN, "--device", "cuda", "--out", os.path.join(tmp, str(procs))]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            report.add_row("ddp", {"processes": procs, "exit": done.returncode,
                                   "s": round(time.perf_counter() - start, 1)})


@dataclasses.dataclass
class Report:
    path: str
    facts: dict = dataclasses.field(default_factory=dict)
    sections: dict = dataclasses.field(default_factory=dict)

    def add_row(self, section, row):
        self.sections.setdefault(section, []).append(row)

    def write(self):
        with_json = os.path.splitext(self.path)[0] + ".json"
        write_text_atomic(with_json, json.dumps({"facts": self.facts, "sections": self.sections}, indent=1) + "\n")
        lines = ["# GPU check", "", f"`python benchmarks/gpu_check.py` ({__doc__.splitlines()[0]})", ""]
        lines += [f"- {key}: {value}" for key, value in self.facts.items()]
        for section, rows in self.sections.items():
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
        write_text_atomic(self.path, "\n".join(lines) + "\n")


# (name, function, the seconds it needs at full size: a section starts only if that much budget is left)
SECTIONS = [("device", section_device, 10), ("flux_step", section_flux_step, 120), ("dit_step", section_dit_step, 30),
            ("soft_weight", section_soft_weight, 10), ("kmeans", section_kmeans, 130), ("deploy", section_deploy, 40),
            ("plan", section_plan, 90), ("ddp", section_ddp, 90)]


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = SMOKE if args.smoke else Sizes()
    report = Report(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report.facts.update({"device": name, "torch": torch.__version__, "sizes": "smoke" if args.smoke else "full",
                         "threads": torch.get_num_threads()})
    deadline = time.monotonic() + args.budget
    for section, fn, needs in SECTIONS:
        left = deadline - time.monotonic()
        if not args.smoke and left < needs:
            report.facts[section] = f"skipped: {left:.0f} s of the budget left, it needs about {needs}"
            continue
        start = time.monotonic()
        try:
            if section in ("plan", "ddp"):
                fn(sizes, device, report, timeout=max(30, int(left)))
            else:
                fn(sizes, device, report)
        except Exception as e:  # one section's failure is a result too; the others still run
            report.facts[section] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        report.facts[f"{section} took (s)"] = round(time.monotonic() - start, 1)
        report.write()
        print(f"{section}: {report.facts[f'{section} took (s)']} s", flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny widths, for a CPU: checks that every section runs")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all sections together")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu.md"))
    main(parser.parse_args())
