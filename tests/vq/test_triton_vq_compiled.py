"""The fused Triton VQ kernel (vq/kernels/triton_vq.py) compiled ahead of time for GPUs, on a machine without one:
Triton lowers it to PTX and ptxas to machine code for the named architecture, which the interpreter that
test_triton_vq.py runs on a CPU never does (an op or layout the GPU compiler rejects passes there). The compiled
kernel must also keep every value in registers: a stack frame means spills to local memory, which cost a
memory-bound kernel more than they save. Skipped where triton is not installed (CI installs it beside the wheel).
Named to be collected after test_triton_vq.py, which must import triton first on a CPU (with TRITON_INTERPRET=1)."""
import importlib.util
import os
import subprocess

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vq4dit.vq.kernels.triton_vq import MAX_GATHER_TABLE, _vq_matmul_kernel, kernel_config  # noqa: E402

POINTERS = ("x_ptr", "idx_ptr", "cb_ptr", "bias_ptr", "y_ptr")
SCALARS = ("M", "N", "K", "rows_per_group", "table_values", "stride_xm", "stride_ym")
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}
GATHERED = (3, 256, 4)  # W2 k256 d4 with q, k, v as three codebooks: the default's largest table
LOADED = (16, 256, 4)  # more values than MAX_GATHER_TABLE: codewords read through the cache


def compile_for(arch, config, dtype):
    """The kernel as `config` (a KernelConfig) launches it on `dtype` inputs and uint8 indices, compiled for
    CUDA compute capability `arch`. A fresh JITFunction: test_triton_vq.py may have left the module's kernel
    interpreted (TRITON_INTERPRET=1 when it was imported)."""
    kernel = JITFunction(_vq_matmul_kernel.fn)
    signature = {name: f"*{'u8' if name == 'idx_ptr' else TRITON_DTYPE[dtype]}" for name in POINTERS}
    signature |= {name: "i32" for name in SCALARS} | {name: "constexpr" for name in config.constants}
    source = ASTSource(fn=kernel, signature=signature, constexprs=config.constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def resource_usage(cubin, tmp_path):
    """{"REG": registers per thread, "STACK": stack frame bytes, ...} of the one kernel in `cubin`, as the cuobjdump
    that Triton's package carries reads it."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in (field.split(":") for field in line.split() if ":" in field)
            if value.isdigit()}


def test_the_codebooks_pick_the_table_the_cases_name():
    assert GATHERED[0] * GATHERED[1] * GATHERED[2] <= MAX_GATHER_TABLE < LOADED[0] * LOADED[1] * LOADED[2]
    assert kernel_config(torch.float32, LOADED, 16, True).constants["TABLE"] == "load"


@pytest.mark.parametrize("dtype,codebooks,rows", [
    (torch.float32, GATHERED, 1024), (torch.float32, LOADED, 1024), (torch.bfloat16, GATHERED, 1024),
    (torch.bfloat16, LOADED, 1024), (torch.bfloat16, GATHERED, 1)],
    ids=["fp32-gather-64", "fp32-load-64", "bf16-gather-64", "bf16-load-64", "bf16-gather-16"])
def test_the_launch_compiles_for_hopper_without_spilling(dtype, codebooks, rows, tmp_path, monkeypatch):
    """sm_90 (H100, H200), 64-row tiles (the most registers) and one 16-row tile (another tile shape to lower).
    Mutations caught: Triton's default 4 warps (a 64-row tile spills: stack 96-120 bytes), software pipelining of
    the "load" table (num_stages 3: 5 KiB of stack per thread in float32). The launch a GPU gets, whatever
    test_triton_vq.py set for the interpreter (its bfloat16 workaround is not the GPU's kernel)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = kernel_config(dtype, codebooks, rows, has_bias=True)
    assert not config.constants["DOT_FP32"]
    usage = resource_usage(compile_for(90, config, dtype).asm["cubin"], tmp_path)
    assert usage["STACK"] == 0, (config, usage)


def test_the_default_launch_compiles_for_an_rtx_4090_without_spilling(tmp_path):
    """sm_89, the 24 GiB card of issue 31; the default W2 table at the largest row tile."""
    config = kernel_config(torch.float32, GATHERED, 1024, has_bias=True)
    usage = resource_usage(compile_for(89, config, torch.float32).asm["cubin"], tmp_path)
    assert usage["STACK"] == 0, (config, usage)
