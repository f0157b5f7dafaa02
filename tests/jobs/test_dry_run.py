"""quantize.py --dry-run: the plan of a run that would run, refused in the run's own words where the run would stop,
and its --json written only where it replaces nothing but an earlier plan."""
import json

import pytest

from tests.cli_helpers import run_here

# a fourth new user's trial: runs refused within seconds that --dry-run planned (exit 0)
FIRST_CHECKS = {
    "bits settings that fit no layer": ("--bits", "3", "--bits-settings", "256x3"),
    "streamed model probes": ("--bits", "1.5", "--stream", "on"),
    "no device name": ("--device", "tpu"),
    "cache dir a file": ("--cache-dir", "{file}"),
    "cache dir under a file": ("--cache-dir", "{file}/sub", "--max-cache-gb", "0"),
}


def test_a_dry_run_without_a_plan_says_so_and_writes_no_json_silently(tmp_path):
    """--dry-run --json for a run with no memory plan (here --method rtn) exited 0 having written nothing, and
    --dry-run alone printed the config and nothing about the plan (mutations: no check; no line)."""
    proc = run_here("quantize.py", "--method", "rtn", "--dry-run", "--json", tmp_path / "plan.json")
    assert proc.returncode == 2 and "no memory plan for this run" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "plan.json").exists()
    proc = run_here("quantize.py", "--method", "rtn", "--dry-run")
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].startswith("no memory plan for this run")


@pytest.mark.parametrize("case", ["empty directory", "bare Flux transformer", "codebook larger than a layer",
                                  *FIRST_CHECKS])
def test_a_dry_run_refuses_what_the_run_refuses_in_its_words(tmp_path, case):
    """A new user's trial: --dry-run planned (or printed nothing for) a --ckpt the run refuses, a pipeline's bare
    transformer/ folder or an empty directory, and a codebook larger than a layer's sub-vectors. Now the dry run
    asks the run's checks (models.loading.diffusers_dit_dir, vq.layer.check_shape) and ends with the run's error
    line. A fourth trial: the run's first checks too (jobs.preflight.check_inputs, and --bits-settings none of which
    fits a layer: jobs.allocation.check_fits). Mutations: any of these checks left out of the plan (the dry run exits
    0), the cache directory's parent not checked (a traceback from the recording)."""
    flags = ["--ckpt", tmp_path / "t"]
    (tmp_path / "t").mkdir()
    if case == "bare Flux transformer":
        (tmp_path / "t" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
        (tmp_path / "t" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    elif case == "codebook larger than a layer":
        flags = ["--codebook-size", "65536", "--dim", "8"]
    elif case in FIRST_CHECKS:
        (tmp_path / "afile").write_text("hi")
        flags = [str(a).format(file=tmp_path / "afile") for a in FIRST_CHECKS[case]]
    planned = run_here("quantize.py", *flags, "--dry-run")
    run = run_here("quantize.py", *flags, "--out", tmp_path / "out")
    assert planned.returncode == run.returncode == 2
    assert planned.stderr.strip().splitlines()[-1] == run.stderr.strip().splitlines()[-1], planned.stderr[-300:]


def test_a_dry_run_refuses_a_prompts_file_the_run_cannot_read(tmp_path):
    """--dry-run planned a run whose --prompts file does not exist (mutation: not read in the dry run)."""
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    proc = run_here("quantize.py", "--ckpt", tmp_path / "pipe", "--prompts", tmp_path / "none.txt", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot read prompts file {tmp_path / 'none.txt'}")


def test_the_plans_json_replaces_only_an_earlier_plan(tmp_path):
    """--dry-run --json FILE replaced whatever FILE was: the config being read, the checkpoint, an artifact's model
    file (a fourth new user's trial). Now, as evaluate.py --json: only an earlier plan is replaced, and a path under
    a file is one line, not a traceback. Mutations: the check left out (the files become JSON), an earlier plan
    refused (the rerun fails)."""
    config = tmp_path / "mine.yaml"
    config.write_text("wbits: 2\n")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    for path in (config, model):
        proc = run_here("quantize.py", "--config", config, "--dry-run", "-q", "--json", path)
        assert proc.returncode == 2, proc.stderr[-300:]
        assert f"--json {path}: exists and is not a plan" in proc.stderr.strip().splitlines()[-1]
    assert config.read_text() == "wbits: 2\n" and model.read_bytes() == b"weights"
    proc = run_here("quantize.py", "--dry-run", "-q", "--json", model / "plan.json")
    assert proc.returncode == 2 and "not a writable directory" in proc.stderr.strip().splitlines()[-1]
    plan = tmp_path / "plan.json"
    for _ in range(2):  # the second run replaces the first's plan
        assert run_here("quantize.py", "--dry-run", "-q", "--json", plan).returncode == 0
    assert json.loads(plan.read_text())["device_peak_bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml", "model.safetensors", "plan.json"]


def test_a_key_the_run_does_not_read_neither_refuses_it_nor_moves_the_plan(tmp_path):
    """The review: a preset's cache_dir with a file in the way refused a k-means run, which never uses the cache; an
    online run's plan grew with a calib_timesteps it does not read (0.74 vs 12.89 GiB). Mutations: check_inputs
    checking cache_dir whatever the method; the plan taking the calib_timesteps given."""
    (tmp_path / "afile").write_text("hi")
    config = tmp_path / "mine.yaml"
    config.write_text(f"cache_dir: {tmp_path / 'afile' / 'sub'}\n")
    proc = run_here("quantize.py", "--config", config, "--method", "kmeans", "--dry-run", "-q")
    assert proc.returncode == 0, proc.stderr[-300:]
    peaks = []
    for kept in (1, 50):
        config.write_text(f"calib_timesteps: {kept}\n")
        plan = tmp_path / f"plan{kept}.json"
        assert run_here("quantize.py", "--config", config, "--recipe", "authors", "--dry-run", "-q", "--json",
                        plan).returncode == 0
        written = json.loads(plan.read_text())
        peaks.append((written["device_peak_bytes"], written["host_peak_bytes"]))
    # the host figures hold this process's own size, measured at each plan (it grows a little in between)
    assert peaks[0][0] == peaks[1][0] and abs(peaks[0][1] - peaks[1][1]) < 0.01 * peaks[0][1], peaks
