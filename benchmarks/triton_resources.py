"""Registers, stack (spills) and shared memory of the fused VQ kernel compiled ahead of time for GPUs, without one.

For each architecture, input dtype, codebook table and row tile: the launch vq4dit uses (kernel_config) against
Triton's default options (4 warps, 3 pipeline stages). Static facts of the compiled code, not timings: a stack
frame means spills to local memory. Needs triton (`pip install triton`); no GPU.

    python benchmarks/triton_resources.py --out benchmarks/results/triton_resources.md
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project and its tests, whatever the working directory

from tests.vq.test_triton_vq_compiled import GATHERED, LOADED, compile_for, resource_usage  # noqa: E402
from vq4dit.vq.kernels.triton_vq import KernelConfig, kernel_config  # noqa: E402

ARCHS = {90: "sm_90 (H100, H200)", 89: "sm_89 (RTX 4090, L40S)", 80: "sm_80 (A100)"}
TABLES = {"gather": GATHERED, "load": LOADED}


def usage(arch, config, dtype, scratch):
    u = resource_usage(compile_for(arch, config, dtype).asm["cubin"], scratch)
    return u["REG"], u["STACK"]


def rows(archs, scratch):
    for arch in archs:
        for dtype in (torch.float32, torch.bfloat16):
            for table, codebooks in TABLES.items():
                for m in (1, 1024):
                    ours = kernel_config(dtype, codebooks, m, has_bias=True)
                    default = KernelConfig(ours.constants, num_warps=4, num_stages=3)
                    (r0, s0), (r1, s1) = usage(arch, default, dtype, scratch), usage(arch, ours, dtype, scratch)
                    yield (ARCHS[arch], str(dtype).removeprefix("torch."), table, ours.constants["BLOCK_M"],
                           f"{r0} / {s0}", f"{ours.num_warps} / {ours.num_stages}", f"{r1} / {s1}")


def main(args):
    head = ("architecture", "dtype", "table", "row tile", "Triton's default (4 warps, 3 stages): registers / stack B",
            "ours: warps / stages", "ours: registers / stack B")
    lines = [f"# The fused VQ kernel compiled for GPUs (triton {triton.__version__})", "",
             "`python benchmarks/triton_resources.py`: ptxas's registers per thread and stack frame (spills) in bytes,",
             "per thread; W2 k256 d4 codebooks, 3 of them (\"gather\": held in the program) or 16 (\"load\": read",
             "through the cache).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with tempfile.TemporaryDirectory() as scratch:
        for row in rows(args.archs, Path(scratch)):
            lines.append("| " + " | ".join(map(str, row)) + " |")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, nargs="+", default=sorted(ARCHS, reverse=True), choices=sorted(ARCHS))
    parser.add_argument("--out", default="benchmarks/results/triton_resources.md")
    main(parser.parse_args())
