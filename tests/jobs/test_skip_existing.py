"""quantize.py --skip-existing (run.sh's reruns): an artifact this same run made is kept, anything else is made again.
The artifact's quant_config.json records run_key, jobs.runkey.RunKey's digest: the config without its run-only
fields, and the checkpoint (and prompts file) by content."""
import json

from tests.cli_helpers import run_here, save_tiny_ckpt
from tests.conftest import randomize
from vq4dit.models.loading import DiTSpec, save_dit
from vq4dit.vq import load_quantized
from vq4dit.vq.artifact import DIGEST, content_digest


def quantize(ckpt, out, *flags):
    proc = run_here("quantize.py", "--ckpt", ckpt, "--method", "rtn", "--out", out, "--skip-existing", *flags)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_a_rerun_keeps_the_same_runs_artifact_and_remakes_any_other(tmp_path):
    """Kept: the same command, and the same command with a run-only field changed (--device). Made again: another
    setting (--seed), the same checkpoint path holding other weights, and an artifact without a run key (mutations:
    the key without the inputs -> the replaced checkpoint's stale artifact kept; the key with the run-only fields ->
    another --device remakes it; no check -> nothing kept)."""
    ckpt, out = tmp_path / "m.safetensors", tmp_path / "art"
    save_tiny_ckpt(ckpt)
    assert quantize(ckpt, out) == f"wrote {out}"
    made = (out / "model.safetensors").stat().st_mtime_ns
    assert quantize(ckpt, out) == f"kept {out}: it holds the artifact of this run (the same config and input files)"
    assert quantize(ckpt, out, "--device", "cpu").startswith("kept")
    assert (out / "model.safetensors").stat().st_mtime_ns == made
    assert quantize(ckpt, out, "--seed", "1") == f"wrote {out}"
    assert quantize(ckpt, out, "--seed", "1").startswith("kept")
    save_dit(randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build(), seed=7),
             "DiT-Digits/2", ckpt)
    assert quantize(ckpt, out, "--seed", "1") == f"wrote {out}"
    quant = json.loads((out / "quant_config.json").read_text())
    del quant["run_key"]  # as saved before run keys were recorded, its content digest made again
    quant[DIGEST] = content_digest(quant)
    (out / "quant_config.json").write_text(json.dumps(quant))
    assert load_quantized(out)[2].get("run_key") is None
    assert quantize(ckpt, out, "--seed", "1") == f"wrote {out}"


def test_a_damaged_artifact_of_this_run_is_made_again(tmp_path):
    """A new user's trial: --skip-existing kept an artifact whose model.safetensors was truncated or had a byte
    flipped, or whose config.yaml was deleted (exit 0; sample.py then refused it). Now the kept artifact's files are
    checked as the loader checks them (size, sha256) and a damaged one is made again (mutation: the run key alone)."""
    ckpt, out = tmp_path / "m.safetensors", tmp_path / "art"
    save_tiny_ckpt(ckpt)
    quantize(ckpt, out)
    model = out / "model.safetensors"
    whole = model.read_bytes()
    flipped = whole[:-1] + bytes([whole[-1] ^ 1])
    for damage in (lambda: model.write_bytes(whole[:-100]), lambda: model.write_bytes(flipped),
                   lambda: (out / "config.yaml").unlink()):
        damage()
        assert quantize(ckpt, out) == f"wrote {out}"
        assert model.read_bytes() == whole and quantize(ckpt, out).startswith("kept")
