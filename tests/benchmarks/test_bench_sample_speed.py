"""benchmarks/bench_sample_speed.py's GPU path and its log reading, without a GPU or a sampling run."""
from benchmarks.bench_sample_speed import devices, job_seconds, parse_args, sample_command


def test_cuda_rows_are_added_when_a_gpu_is_present_and_sample_on_it():
    """Mutation caught: the CUDA rows never added (devices ignores cuda_available), or a CUDA row's sample.py run
    without --device cuda (measuring the CPU twice)."""
    assert devices(None, cuda_available=False) == ["cpu"]
    assert devices(None, cuda_available=True) == ["cpu", "cuda"]
    assert devices(["cuda:1"], cuda_available=True) == ["cuda:1"]
    args = parse_args(["--smoke"])
    cmd = sample_command("w2", "cuda", {"w2": "art/w2"}, [], args, "out")
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--quantized") + 1] == "art/w2"
    fp = sample_command("fp", "cpu", {"w2": "art/w2"}, ["--model", "DiT-S/8"], args, "out")
    assert "--quantized" not in fp and fp[fp.index("--model") + 1] == "DiT-S/8"


def test_job_seconds_reads_the_last_wrote_line(tmp_path):
    """Mutation caught: the first match taken instead of the last, or the count and seconds swapped."""
    log = tmp_path / "run.log"
    log.write_text("x wrote 3 samples to /a in 9.0 s\n2026 vq4dit.jobs.sample wrote 200 samples to /tmp/o in 41.5 s\n"
                   "TIME 50.1 600000 48.0 1.2\n")
    assert job_seconds(str(log)) == (200, 41.5)
