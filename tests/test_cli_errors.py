"""Issue 6: every bad input to quantize.py / sample.py is one `error:` line, exit 2, no traceback, no output.

Each case runs an entry script on a tiny checkpoint or artifact written to tmp. Those that fail at load run its
cli(argv) in this process (tests.cli_helpers.run_here: the same run_cli ending, without 3 s of a new interpreter
importing torch); a missing checkpoint and a sound artifact's --check run the real scripts in a subprocess, as do the
flag checks that answer before torch is imported. A full disk and a file-size limit at quantize.py's writes:
tests/test_write_hazards.py.
"""
import json
import os
import shlex
import shutil
import struct

import pytest
import torch

from tests.cli_helpers import FAST, assert_user_error, leftovers, run, run_here, save_tiny_ckpt
from tests.conftest import randomize
from vq4dit.models.loading import DiTSpec, save_dit
from vq4dit.vq.apply import quantize_linears
from vq4dit.vq.artifact import MODEL_FILE, QUANT_FILE, file_sha256, save_quantized, write_quant_config
from vq4dit.vq.layer import CodebookSpec
from vq4dit.vq.modelref import reference


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_tiny_ckpt(path)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A complete k-means artifact of the tiny model (k=4, d=4): every test damages its own copy."""
    spec = DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1)
    model = randomize(spec.build())
    for layer in quantize_linears(model, CodebookSpec(4, 4, kmeans_iters=2), progress=False).values():
        layer.harden()
    out = tmp_path_factory.mktemp("artifact") / "art"
    save_quantized(model, reference(model, name=spec.name), out, {"method": "kmeans"})
    return out


def copy_of(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "art")


def quantize_errors(ckpt, tmp_path, *args, runner=run_here):
    out = tmp_path / "out"
    return runner("quantize.py", "--ckpt", ckpt, *FAST, *args, "--out", out), out


# ---- quantize.py: checkpoints -------------------------------------------------------------------------------------

def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "missing.safetensors"
    result, out = quantize_errors(missing, tmp_path, runner=run)  # the real script's ending, in a process of its own
    assert_user_error(result, missing, "does not exist", out=out)


def test_garbage_safetensors(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(os.urandom(4096))
    result, out = quantize_errors(bad, tmp_path)
    assert_user_error(result, bad, "safetensors", out=out)


@pytest.mark.parametrize("name, cut", [("empty.pt", 0), ("truncated.pt", 3000), ("truncated.safetensors", 3000)])
def test_empty_or_truncated_checkpoint(ckpt, tmp_path, name, cut):
    bad = tmp_path / name
    if name.endswith(".pt"):
        torch.save(save_tiny_ckpt(tmp_path / "whole.safetensors").state_dict(), bad)
    else:
        shutil.copy(ckpt, bad)
    bad.write_bytes(bad.read_bytes()[:cut])
    result, out = quantize_errors(bad, tmp_path)
    assert_user_error(result, bad, "empty file" if cut == 0 else "truncated" if name.endswith(".pt") else "safetensors",
                      out=out)


def test_weights_of_another_architecture(ckpt, tmp_path):
    result, out = quantize_errors(ckpt, tmp_path, "--model", "DiT-S/2")
    line = assert_user_error(result, ckpt, "DiT-S/2", out=out)
    # names the differing key and its shapes, and what the weights look like
    assert "(1, 16, 128)" in line and "(1, 16, 384)" in line
    assert "DiT-Digits/2" in line and "hidden 128" in line


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_pickle_that_runs_code_is_refused(ckpt, tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    state = {"pos_embed": torch.zeros(1, 16, 128), "payload": _RunsCode(marker)}
    torch.save(state, evil)
    result, out = quantize_errors(evil, tmp_path)
    line = assert_user_error(result, evil, "weights_only", out=out)
    assert "weights_only` set to `False`" not in line  # never advise the unsafe load
    assert not marker.exists()
    # the payload is live: an unsafe load does run it, so the check above means something
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_nan_weights_are_refused(tmp_path):
    model = randomize(DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build())
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight[3, 5] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_dit(model, "DiT-Digits/2", bad)
    result, out = quantize_errors(bad, tmp_path)
    assert_user_error(result, bad, "blocks.2.mlp.fc2.weight", "NaN", out=out)


# ---- quantize.py: flags -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, names", [
    (("--wbits", "0"), ("wbits=0",)),
    (("--codebook-size", "1"), ("codebook_size=1", "2..65536")),
    (("--codebook-size", "65537"), ("codebook_size=65537", "2..65536")),
    (("--wbits", "5", "--dim", "4", "--codebook-size", None), ("codebook_size=1048576", "wbits=5")),
    (("--iters", "0"), ("iters=0",)),
    (("--steps", "0"), ("steps=0",)),
    (("--steps", "-3"), ("steps=-3",)),
])
def test_impossible_quantizer_values(ckpt, tmp_path, flags, names):
    args = list(FAST)
    if None in flags:  # drop FAST's --codebook-size so that k = 2^(wbits*dim)
        i = args.index("--codebook-size")
        del args[i:i + 2]
        flags = flags[:-2]
    out = tmp_path / "out"
    result = run("quantize.py", "--ckpt", ckpt, *args, *flags, "--out", out)
    assert_user_error(result, *names)
    assert not out.exists()  # config errors answer before anything is created


def test_dim_not_dividing_in_features(ckpt, tmp_path):
    result, out = quantize_errors(ckpt, tmp_path, "--dim", "3")
    assert_user_error(result, "dim=3", "128", out=out)


def test_quantize_out_under_a_regular_file(ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    result = run_here("quantize.py", "--ckpt", ckpt, *FAST, "--out", target)
    assert_user_error(result, target)


@pytest.mark.parametrize("flags, named", [(("--include", "^nothing"), "--include '^nothing'"),
                                          (("--exclude", ".", "--dry-run"), "--exclude '.'")])
def test_a_selection_of_no_layer_names_the_flags(ckpt, tmp_path, flags, named):
    """--include / --exclude that select no Linear: the run said "include pattern '^(?=.*?(?:^nothing))' matches no
    nn.Linear" (the combined regex, not what the user typed), and --dry-run ended in a ZeroDivisionError traceback.
    Now both name the flags and show how the layers are named (mutations: the plan not checking -> the traceback;
    the combined pattern in the message)."""
    result, out = quantize_errors(ckpt, tmp_path, *flags)
    assert_user_error(result, f"no nn.Linear of the model matches {named}", "blocks.0.attn.qkv", out=out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(ckpt, tmp_path):
    result, out = quantize_errors(ckpt, tmp_path, "--device", "cuda")
    assert_user_error(result, "--device cuda", out=out)


# ---- sample.py: artifacts -----------------------------------------------------------------------------------------

def sample_errors(tmp_path, *args):
    out = tmp_path / "samples"
    result = run_here("sample.py", *args, "--out", out, "--steps", "2", "--num-samples", "2", "--device", "cpu", "-q")
    return result, out


def _data_range(path, key):
    """Absolute byte range of tensor `key` in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _truncate(art):
    path = art / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, "truncated"


def _corrupt_header(art):
    path = art / MODEL_FILE
    raw = bytearray(path.read_bytes())
    raw[8:24] = b"\x00" * 16
    path.write_bytes(bytes(raw))
    return path, "sha256 differs"


def _corrupt_data(art):
    """NaN bytes in a codebook, with the file's new sha256 recorded: the checks behind the digest must refuse it."""
    path = art / MODEL_FILE
    raw = bytearray(path.read_bytes())
    begin, end = _data_range(path, "blocks.1.mlp.fc1.codebook")  # fp16: all-ones bytes are NaN
    raw[begin:end] = b"\xff" * (end - begin)
    path.write_bytes(bytes(raw))
    _edit_config(art, lambda quant: quant.update(model_sha256=file_sha256(path)))
    return path, "blocks.1.mlp.fc1.codebook"


def _edit_config(art, edit):
    """Edit quant_config.json and record its new content digest, as a tool rewriting it would."""
    quant = json.loads((art / QUANT_FILE).read_text())
    edit(quant)
    write_quant_config(art, quant)


def _flip_byte(art):
    path = art / MODEL_FILE
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x04
    path.write_bytes(bytes(raw))
    return path, "sha256 differs"


def _config_edited(art):
    text = (art / QUANT_FILE).read_text()
    (art / QUANT_FILE).write_text(text.replace('"n": 2', '"n": 3', 1))
    return art / QUANT_FILE, "content_sha256"


def _config_missing(art):
    (art / QUANT_FILE).unlink()
    return art / QUANT_FILE, "missing"


def _config_malformed(art):
    (art / QUANT_FILE).write_text('{"format_version": 1, "layers": ')
    return art / QUANT_FILE, "malformed"


def _config_newer(art):
    quant = json.loads((art / QUANT_FILE).read_text())
    quant["format_version"] += 1
    (art / QUANT_FILE).write_text(json.dumps(quant))
    return art / QUANT_FILE, f"format_version {quant['format_version']}"


def _config_disagrees(art):
    _edit_config(art, lambda quant: quant["tensors"]["pos_embed"].update(shape=[1, 16, 64]))
    return art / MODEL_FILE, "pos_embed"


DAMAGE = [_truncate, _corrupt_header, _flip_byte, _config_missing, _config_malformed, _config_newer, _config_edited,
          _config_disagrees]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__[1:] for d in DAMAGE])
def test_damaged_artifact(artifact, tmp_path, damage):
    art = copy_of(artifact, tmp_path)
    path, what = damage(art)
    result, out = sample_errors(tmp_path, "--quantized", art)
    assert_user_error(result, path, what, out=out)


@pytest.mark.parametrize("name", [MODEL_FILE, QUANT_FILE])
def test_a_file_of_an_artifact_given_as_quantized_names_its_directory(artifact, ckpt, tmp_path, name):
    """--quantized ART/model.safetensors (a file where the directory belongs) said "give an artifact directory
    written by quantize.py", as for any file; it now names ART, and any other file keeps the general hint
    (mutation: the artifact's directory named for every file)."""
    result, out = sample_errors(tmp_path, "--quantized", artifact / name)
    assert_user_error(result, f"{artifact / name}: not a directory; give the artifact's directory, {artifact}",
                      out=out)
    result, out = sample_errors(tmp_path, "--quantized", ckpt)
    assert_user_error(result, f"{ckpt}: not a directory; give an artifact directory written by quantize.py", out=out)


def test_check_reports_a_sound_artifact(artifact, tmp_path):
    result = run("sample.py", "--quantized", artifact, "--check")
    assert result.returncode == 0, result.stderr[-2000:]
    n = len(json.loads((artifact / QUANT_FILE).read_text())["tensors"])
    mb = (artifact / MODEL_FILE).stat().st_size / 1e6
    assert result.stdout.strip() == f"ok: {artifact} ({n} tensors, {mb:.2f} MB)"


def test_check_reports_a_damaged_artifact(artifact, tmp_path):
    """NaN bytes in a codebook: what sampling would load, --check refuses (sampling runs the same load)."""
    art = copy_of(artifact, tmp_path)
    path, what = _corrupt_data(art)
    result = run_here("sample.py", "--quantized", art, "--check")
    assert_user_error(result, path, what)
    assert "ok:" not in result.stdout


# sample.py's --num-samples / --steps / --classes checks: tests/test_sample.py and tests/test_sample_flags.py

def test_sample_out_under_a_regular_file(ckpt, tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    result = run_here("sample.py", "--ckpt", ckpt, "--steps", "2", "--num-samples", "2", "--device", "cpu", "-q",
                      "--out", target)
    assert_user_error(result, target)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("script, args, asked", [
    ("quantize.py", ("--config", "dit_xl_256_w2", "--device", "cpu"), "DiT-XL/2 at 256px with 1000 classes"),
    ("sample.py", ("--model", "DiT-XL/2", "--num-samples", "2", "--device", "cpu"), "DiT-XL/2 needs --ckpt"),
])
def test_a_real_model_without_ckpt_says_ckpt_is_missing(tmp_path, script, args, asked):
    """A preset or --model of a real DiT without --ckpt blamed the embedded digits file the user never named ("is a
    16px model"; "does not match model DiT-XL/2"); now it says --ckpt is missing (mutation: the check left out)."""
    result = run_here(script, *args, "--out", tmp_path / "out")
    assert_user_error(result, "no --ckpt given", asked)
    assert "dit_digits" not in result.stderr


@pytest.mark.parametrize("method", ["vq4dit", "rtn"])
def test_dry_run_refuses_a_missing_or_unreadable_ckpt(tmp_path, method):
    """--dry-run passed a run that fails at once: a missing --ckpt printed the config with exit 0, and a truncated
    safetensors file got a plan for an ImageNet DiT (mutations: no existence check in plan_source; the unreadable
    header taken as a .pt checkpoint's)."""
    assert_user_error(run_here("quantize.py", "--dry-run", "--method", method, "--ckpt", tmp_path / "nope.pt"),
                      f"checkpoint {tmp_path / 'nope.pt'} does not exist")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    if method != "rtn":  # rtn has no plan
        assert_user_error(run_here("quantize.py", "--dry-run", "--ckpt", truncated),
                          f"{truncated}: not a readable safetensors file")


@pytest.mark.parametrize("given, named", [(("--image-size", 256), "image_size"), (("--model", "DiT-XL/2"), "model"),
                                          (("--num-classes", 10, "--image-size", 32), "image_size, num_classes")])
def test_quantize_refuses_dit_settings_with_a_pipeline(tmp_path, given, named):
    """--model, --image-size and --num-classes with a diffusers pipeline did nothing and were written to the
    artifact's config.yaml; now they are refused before anything runs, as sample.py refuses them (mutation: the
    check left out of quantize.py -> the run goes on to load the pipeline). A DiT preset's values are not: the
    preset may name a diffusers DiT pipeline, and no flag could unset them."""
    from vq4dit.jobs.config import load_config

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    line = assert_user_error(run("quantize.py", "--ckpt", tmp_path / "pipe", *given, "--dry-run"))
    assert line.startswith(f"error: {named}: not used with the diffusers pipeline --ckpt {tmp_path / 'pipe'}"), line
    load_config("dit_xl_256_w2", {"ckpt": str(tmp_path / "pipe")}).model.check_pipeline_flags({"model": None})
