import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vq4dit.models.dit import DiT_configs, DiT_models
from vq4dit.models.loading import DiTSpec, describe_weights, load_dit, registry_name, save_dit
from vq4dit.utils.errors import UserError


def official_keys(depth):
    """The state-dict keys of the official checkpoints, as listed in docs/method.md "Checkpoint keys"."""
    keys = {"pos_embed", "y_embedder.embedding_table.weight"}
    pairs = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
             "final_layer.adaLN_modulation.1"]
    for i in range(depth):
        pairs += [f"blocks.{i}.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
    return keys | {f"{p}.{w}" for p in pairs for w in ("weight", "bias")}


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_registry_has_official_keys_and_shapes(name):
    depth, hidden, heads, patch = DiT_configs[name]
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=1000, in_channels=4)
    state = model.state_dict()
    assert set(state) == official_keys(depth)
    assert state["pos_embed"].shape == (1, (32 // patch) ** 2, hidden)
    assert state["x_embedder.proj.weight"].shape == (hidden, 4, patch, patch)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert state["blocks.0.mlp.fc1.weight"].shape == (4 * hidden, hidden)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (6 * hidden, hidden)
    assert state["final_layer.linear.weight"].shape == (patch * patch * 8, hidden)
    assert state["y_embedder.embedding_table.weight"].shape == (1001, hidden)
    assert model.blocks[0].attn.num_heads == heads
    assert registry_name(depth, hidden, patch, heads) == name
    # the official names describe themselves
    assert describe_weights(state).startswith(name)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_plain_state_dict_round_trip(tmp_path, tiny_latent_dit):
    model, spec = tiny_latent_dit
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    loaded, got = load_dit(None, str(path))
    assert got == spec and got.image_size == 64
    assert_same_weights(model, loaded)
    loaded, got = load_dit("DiT-Digits/2", str(path), image_size=64, num_classes=10)
    assert got == spec


def test_training_checkpoint_uses_ema(tmp_path, tiny_dit):
    model, spec = tiny_dit
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    # as DiT's train.py writes it: the argparse arguments beside the weights
    args = argparse.Namespace(model="DiT-Digits/2", image_size=16, results_dir="results", global_seed=0)
    torch.save({"model": model.state_dict(), "ema": ema, "opt": {}, "args": args}, path)
    loaded, _ = load_dit("DiT-Digits/2", str(path))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_noise_only_model_is_refused(tmp_path):
    model = DiT_models["DiT-Digits/2"](input_size=8, num_classes=10, in_channels=1, learn_sigma=False)
    path = tmp_path / "eps_only.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(UserError, match=re.escape(f"{path}: the model predicts the noise only (learn_sigma=False)")):
        load_dit(None, str(path))


def test_safetensors_round_trip(tmp_path, tiny_dit):
    model, spec = tiny_dit
    path = tmp_path / "m.safetensors"
    save_dit(model, spec.name, path)
    loaded, got = load_dit(None, str(path))
    assert got == spec
    assert_same_weights(model, loaded)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    assert torch.equal(model(x, t, y), loaded(x, t, y))


def test_mismatch_names_first_difference_and_guess(tmp_path, tiny_latent_dit):
    model, _ = tiny_latent_dit
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(UserError) as e:
        load_dit("DiT-S/2", str(path))
    msg = str(e.value)
    assert "DiT-Digits/2" in msg and "depth 6" in msg and "hidden 128" in msg
    assert re.search(r"'\S+' has shape|missing key|unexpected key", msg)
    with pytest.raises(UserError, match="pos_embed"):
        load_dit("DiT-Digits/2", str(path), image_size=128)


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dit(None, str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_dit(None, str(junk))
    with pytest.raises(UserError, match="without a diffusers DiT"):
        load_dit(None, str(tmp_path))
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        load_dit(None, str(tmp_path / "dict.pt"))
    with pytest.raises(UserError, match="unknown --model"):
        torch.save(DiTSpec("DiT-Digits/2", 8, 10, 1).build().state_dict(), tmp_path / "ok.pt")
        load_dit("DiT-Q/2", str(tmp_path / "ok.pt"))
    # a quantized artifact's directory is named as one, as its model.safetensors is (mutation: only the file checked)
    from safetensors.torch import save_file

    (tmp_path / "art").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "art" / "model.safetensors", metadata={"format": "vq4dit-quantized"})
    with pytest.raises(UserError, match=f"quantized vq4dit artifact.*sample.py --quantized {tmp_path / 'art'}$"):
        load_dit(None, str(tmp_path / "art"))
    # another directory's model.safetensors (a text encoder's: GBs) is not read (mutation: read whole -> its NaN named)
    (tmp_path / "te").mkdir()
    save_file({"w": torch.tensor([float("nan")])}, tmp_path / "te" / "model.safetensors")
    with pytest.raises(UserError, match="is a directory without a diffusers DiT"):
        load_dit(None, str(tmp_path / "te"))
    # weights of another network: named for what they hold, with or without --model (mutation: the check left out ->
    # "cannot tell which model these weights are ...; pass --model", which no --model can satisfy)
    save_file({"conv.0.weight": torch.zeros(2, 1, 3, 3), "fc.weight": torch.zeros(10, 2)}, tmp_path / "cls.safetensors")
    for name in (None, "DiT-S/2"):
        with pytest.raises(UserError, match=r"cls.safetensors: not a DiT checkpoint \(no x_embedder.proj.weight; its "
                                            r"2 tensors are named like conv.0.weight, fc.weight\)"):
            load_dit(name, str(tmp_path / "cls.safetensors"))
    # a DiT saved through DDP: the prefix named (mutation: called no DiT)
    wrapped = {f"module.{k}": v for k, v in DiTSpec("DiT-Digits/2", 8, 10, 1).build().state_dict().items()}
    torch.save(wrapped, tmp_path / "ddp.pt")
    with pytest.raises(UserError, match="ddp.pt: a DiT whose tensor names carry the prefix 'module.'"):
        load_dit(None, str(tmp_path / "ddp.pt"))


@pytest.mark.parametrize("argv", [["sample.py", "--model", "foo"], ["quantize.py", "--model", "DiT-XL/9"],
                                  ["quantize.py", "--model", "DiT-XL/9", "--dry-run"]])
def test_an_unknown_model_name_is_named_before_any_hint_about_its_checkpoint(tmp_path, argv):
    """Without --ckpt, an unknown --model said `foo needs --ckpt (its checkpoint ...)`, and the dry run planned the
    embedded model (mutations: the name checked only once the weights are read; the plan not checking it)."""
    from tests.cli_helpers import run_here

    proc = run_here(*argv, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: unknown --model {argv[2]!r}; valid: DiT-XL/2")


# ---- reading files: empty, truncated or altered checkpoints, memory ----------------------------------------------

def test_empty_and_truncated_files_are_one_line_errors(tmp_path, tiny_dit):
    model, spec = tiny_dit
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    save_dit(model, spec.name, tmp_path / "ok.safetensors")
    cases = {"empty.pt": (b"", "empty file (0 bytes)"), "empty.safetensors": (b"", "empty file (0 bytes)"),
             "cut.pt": ((tmp_path / "ok.pt").read_bytes()[:5000], "corrupt or truncated checkpoint archive"),
             "cut.safetensors": ((tmp_path / "ok.safetensors").read_bytes()[:5000], "not a readable safetensors"),
             "header.pt": ((tmp_path / "ok.pt").read_bytes()[:3], "unknown checkpoint format"),
             "stub.pt": (b"\x80\x02", "unknown checkpoint format (torch.load with weights_only failed: EOFError)")}
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / name}: {match}")) as e:
            load_dit(None, str(tmp_path / name))
        assert "\n" not in str(e.value)


def flip_in_tensor(path, value):
    """Flip one bit of the first stored float equal to `value` (found by its bytes); the file stays well-formed."""
    raw = bytearray(path.read_bytes())
    at = raw.index(np.float32(value).tobytes())
    raw[at + 1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_a_pt_tensor_is_caught_by_its_zip_crc(tmp_path, tiny_dit):
    """torch.load itself would load the altered weight silently (checked in the second half)."""
    model, _ = tiny_dit
    state = model.state_dict()
    state["final_layer.linear.bias"][0] = 0.123456
    torch.save(state, tmp_path / "m.pt")
    flip_in_tensor(tmp_path / "m.pt", 0.123456)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'm.pt'}: corrupt or truncated checkpoint archive "
                                                  "(Bad CRC-32")):
        load_dit(None, str(tmp_path / "m.pt"))
    altered = torch.load(tmp_path / "m.pt", weights_only=True)["final_layer.linear.bias"][0]
    assert torch.isfinite(altered) and altered != state["final_layer.linear.bias"][0]


def test_a_pt_written_without_crcs_still_loads(tmp_path, tiny_dit):
    model, _ = tiny_dit
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(model.state_dict(), tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert_same_weights(model, load_dit(None, str(tmp_path / "nocrc.pt"))[0])


def test_a_flipped_byte_in_a_project_safetensors_is_caught_by_its_digest(tmp_path, tiny_dit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, spec = tiny_dit
    with torch.no_grad():
        model.final_layer.linear.bias[0] = 0.123456
    save_dit(model, spec.name, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert len(meta["content_sha256"]) == 64
    flip_in_tensor(tmp_path / "m.safetensors", 0.123456)
    with pytest.raises(UserError, match="m.safetensors: content does not match the content_sha256 in its header"):
        load_dit(None, str(tmp_path / "m.safetensors"))
    # files without a digest (older ones, the embedded model) load as before
    del meta["content_sha256"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "old.safetensors", meta)
    assert_same_weights(model, load_dit(None, str(tmp_path / "old.safetensors"))[0])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_are_read_once_and_assigned_to_a_meta_skeleton(tmp_path, tiny_dit, monkeypatch, suffix):
    """Catches building the model in memory (then copying or assigning): loading would peak at twice the weights."""
    import vq4dit.models.loading as loading

    model, spec = tiny_dit
    path = tmp_path / f"m{suffix}"
    torch.save(model.state_dict(), path) if suffix == ".pt" else save_dit(model, spec.name, path)
    read, builds = {}, []
    real_read, real_build = loading.read_state_file, DiTSpec.build

    def read_state_file(p):
        state, meta = real_read(p)
        read.update(state)
        return state, meta

    def build(self):
        built = real_build(self)
        builds.append(all(t.is_meta for n, t in built.state_dict().items() if n != "pos_embed"))
        return built

    monkeypatch.setattr(loading, "read_state_file", read_state_file)
    monkeypatch.setattr(DiTSpec, "build", build)
    loaded, _ = load_dit(None, str(path))
    assert builds == [True]
    assert all(t.data_ptr() == read[n].data_ptr() for n, t in loaded.state_dict().items())
    assert_same_weights(model, loaded)


def test_a_load_skips_the_init_that_would_import_torchs_compiler_and_a_cpu_build_initialises():
    """Loading builds on meta with no weight init: in a fresh process, loading the embedded model leaves torch._dynamo
    unimported (normal_ of a meta tensor imports it: 2 of sample.py's 5.5 s on a slow CPU). Mutations: the init run
    on meta, or the embedding's own normal_ there -> imported. A build on the CPU still initialises as DiT does
    (mutation: the init skipped everywhere -> an uninitialised embedding, default-initialised adaLN)."""
    import subprocess
    import sys

    code = ("import sys; from vq4dit.models.loading import load_dit; load_dit(None); "
            "print('torch._dynamo' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[2])
    assert found.stdout.strip() == "False", found.stderr[-2000:]
    torch.manual_seed(0)
    built = DiTSpec("DiT-Digits/2", input_size=8, num_classes=10, in_channels=1).build()
    assert built.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert not built.blocks[0].adaLN_modulation[-1].weight.any()


def test_half_precision_weights_load_as_float32(tmp_path, tiny_dit):
    model, _ = tiny_dit
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pt")
    loaded, _ = load_dit(None, str(tmp_path / "half.pt"))
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float32}
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight.half().float())
