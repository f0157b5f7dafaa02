"""What only a GPU shows, in one command (issue 31 item 6, issue 32 item 4): <= 8 minutes on one GPU.

    python benchmarks/gpu_check.py            # on a GPU: writes benchmarks/results/gpu.md and gpu.json
    python benchmarks/gpu_check.py --smoke    # on a CPU, tiny widths: every section runs (outputs/gpu_check_smoke.md)

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
- stream: 6 Flux-dev double blocks stored in bf16 on the host, run in turn at batch 1 as a streamed record's teacher
  forward runs them (models.offload.HostBlocks): with the next block's copies staged ahead on a side stream (the
  default on a GPU) and without, against the blocks resident in fp32; ms per forward, peak memory, outputs equal.
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
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the sections live in two modules by theme; the sizes and timing they share are in gpu_measure, not here, because
# this file runs as __main__: a section importing from it would load a second copy of it (a circular import, and a
# SMOKE that is not main's)
from benchmarks.gpu_calib_sections import (  # noqa: E402
    section_dit_step,
    section_flux_step,
    section_kmeans,
    section_soft_weight,
)
from benchmarks.gpu_measure import SMOKE, Sizes  # noqa: E402
from benchmarks.gpu_run_sections import (  # noqa: E402
    section_ddp,
    section_deploy,
    section_device,
    section_plan,
    section_stream,
)
from vq4dit.utils.fileio import write_text_atomic  # noqa: E402


@dataclasses.dataclass
class Report:
    path: str
    facts: dict = dataclasses.field(default_factory=dict)
    sections: dict = dataclasses.field(default_factory=dict)

    def add_row(self, section, row):
        self.sections.setdefault(section, []).append(row)

    def write(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
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
            ("stream", section_stream, 45), ("plan", section_plan, 90), ("ddp", section_ddp, 90)]


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
    parser.add_argument("--out", default=None, help="default: benchmarks/results/gpu.md; with --smoke "
                        "outputs/gpu_check_smoke.md (a CPU's smoke figures are not the GPU results)")
    args = parser.parse_args()
    args.out = args.out or os.path.join(ROOT, *(("outputs", "gpu_check_smoke.md") if args.smoke else
                                                ("benchmarks", "results", "gpu.md")))
    main(args)
