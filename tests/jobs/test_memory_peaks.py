"""The plan's host peak against the measured peak resident memory (VmHWM) of real quantize runs on the CPU, each in
a fresh process: the embedded model and the tiny Flux pipeline (tests/models/tiny_t2i.py). Memory, not time: the
result does not depend on the machine's load."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.models.tiny_t2i import PROMPTS, save_tiny_t2i_pipeline

SHORT = ["--iters", "2", "--calib-samples", "2", "--calib-timesteps", "2", "--steps", "4", "--kmeans-iters", "2",
         "--codebook-size", "16", "--codebook-init", "kmeans", "--device", "cpu"]  # the output-aware fit: 80% of a run
MIB = 2**20
# one fresh process: the plan first (it measures the process's libraries as a fresh run has them), then the run;
# the planning leaves nothing behind a run would not hold (meta tensors only), so the high-water mark is the run's
RUN = textwrap.dedent("""
    import sys
    from vq4dit.cli.quantize import cli
    argv, plan, out = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
    cli([*argv, "--dry-run", "--json", plan])
    cli([*argv, "--out", out])
    print("VmHWM", next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                        if line.startswith("VmHWM:")))
""")


def measured_and_planned(argv, tmp_path):
    """(the run's peak resident bytes, the plan's JSON) of quantize.py `argv`."""
    plan = tmp_path / "plan.json"
    out = subprocess.run([sys.executable, "-c", RUN, *argv, str(plan), str(tmp_path / "out")], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split("VmHWM")[1].split()[0]), json.loads(plan.read_text())


def check(hwm, plan):
    assert abs(plan["host_peak_bytes"] - hwm) <= 0.1 * hwm + 64 * MIB, (hwm / MIB, plan["host_peak_bytes"] / MIB)
    assert plan["host_peak_bytes"] == max(s["host_bytes"] for s in plan["stages"])
    assert plan["device"] == "cpu"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_plans_host_peak_is_the_embedded_runs(tmp_path):
    """Catches a plan that leaves out the process itself (its libraries: 300+ MiB, the bulk at this size) or counts
    the planning process's own growth (the meta model, the probes) as the run's."""
    check(*measured_and_planned(SHORT, tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_streamed_plans_host_peak_is_the_streamed_embedded_runs(tmp_path):
    """--stream on: the plan's streamed stages (the teacher as stored on the host, one block at a time) against the
    run. Catches streamed stages that leave out the process (its libraries); the embedded model's own tensors (a few
    MiB) are within the tolerance, so its teacher's bytes are checked on real sizes by plan arithmetic only."""
    hwm, plan = measured_and_planned([*SHORT, "--stream", "on"], tmp_path)
    check(hwm, plan)
    walk = max(s["host_bytes"] for s in plan["stages"] if s["name"].startswith("walk"))
    assert abs(walk - hwm) <= 0.1 * hwm + 64 * MIB, (hwm / MIB, walk / MIB)  # not only the save stage's
    assert plan["stages"][1]["name"] == "build quantized layers (block by block)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_plans_host_peak_is_the_tiny_flux_runs(tmp_path):
    """The same for a pipeline's run (prompt encoding, the pipeline's teacher): catches the process left out (its
    libraries, diffusers and transformers among them, are 440 of its 490 MiB)."""
    save_tiny_t2i_pipeline("flux", tmp_path / "pipeline")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = [*SHORT, "--ckpt", str(tmp_path / "pipeline"), "--prompts", str(tmp_path / "prompts.txt"),
            "--batch-size", "4", "--height", "8", "--width", "8"]
    check(*measured_and_planned(argv, tmp_path))
