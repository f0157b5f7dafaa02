"""Artifact round trip (bit-identical decoded weights), format 1 compatibility and integrity checks on load."""
import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vq4dit.models.dit import DiT
from vq4dit.utils.errors import UserError
from vq4dit.vq.apply import quantize_linears, quantize_linears_rtn
from vq4dit.vq.artifact import MODEL_FILE, QUANT_FILE, file_sha256, load_quantized, save_quantized, write_quant_config
from vq4dit.vq.layer import CodebookSpec, VQLinear
from vq4dit.vq.modelref import reference
from vq4dit.vq.packing import packed_nbytes
from vq4dit.vq.rtn import RTNLinear

LEGACY = {"name": "DiT-Digits/2", "input_size": 8, "num_classes": 3, "in_channels": 1, "learn_sigma": True}
REF = reference(DiT.from_config(LEGACY), name="DiT-Digits/2")
CONFIG = {"method": "kmeans", "wbits": 2}


def quantized_model(k=16, d=4, split_qkv=False, rtn_bits=None):
    torch.manual_seed(0)
    model = DiT.from_config(LEGACY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if rtn_bits:
        quantize_linears_rtn(model, rtn_bits)
    else:
        layers = quantize_linears(model, CodebookSpec(k, d, kmeans_iters=2), split_qkv=split_qkv, progress=False)
        for layer in layers.values():
            layer.harden()
    return model.eval()


def decoded(model):
    return {n: m.weight() for n, m in model.named_modules() if isinstance(m, (VQLinear, RTNLinear))}


@pytest.mark.parametrize("kind", [dict(k=256, d=4), dict(k=64, d=2, split_qkv=True), dict(k=32, d=2),
                                  dict(rtn_bits=3)])
def test_round_trip_is_bit_identical(tmp_path, kind):
    model = quantized_model(**kind)
    quant = save_quantized(model, REF, tmp_path, CONFIG)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.yaml", "model.safetensors", "quant_config.json"]
    loaded, ref, quant2 = load_quantized(tmp_path)
    assert ref == REF and quant2 == quant and quant["base_model"] == REF and quant["format_version"] == 2
    assert quant["model_sha256"] == file_sha256(tmp_path / MODEL_FILE)
    before, after = decoded(model), decoded(loaded)
    assert before.keys() == after.keys() and len(before) == 30
    assert all(torch.equal(before[n], after[n]) for n in before)
    state, state2 = model.state_dict(), loaded.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 2])
    assert torch.equal(model(x, t, y), loaded(x, t, y))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == CONFIG


@pytest.mark.parametrize("kind", [dict(k=64, d=2, split_qkv=True), dict(rtn_bits=3)])
def test_decoded_weights_give_the_same_outputs(tmp_path, kind):
    model = quantized_model(**kind)
    save_quantized(model, REF, tmp_path, CONFIG)
    plain, _, _ = load_quantized(tmp_path, decode=True)
    assert not any(isinstance(m, (VQLinear, RTNLinear)) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in plain.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in DiT.from_config(LEGACY).modules())
    for name, weight in decoded(model).items():
        assert torch.equal(plain.get_submodule(name).weight, weight)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 2])
    assert torch.equal(model(x, t, y), plain(x, t, y))


def test_overwriting_an_artifact(tmp_path):
    save_quantized(quantized_model(k=16, d=4), REF, tmp_path, CONFIG)
    model = quantized_model(k=64, d=2)
    save_quantized(model, REF, tmp_path, {"wbits": 3})
    loaded, _, quant = load_quantized(tmp_path)
    assert quant["layers"]["blocks.0.attn.qkv"]["k"] == 64
    assert all(torch.equal(a, b) for a, b in zip(decoded(model).values(), decoded(loaded).values()))


def test_indices_take_exactly_log2_k_bits(tmp_path):
    quant = save_quantized(quantized_model(k=32, d=2), REF, tmp_path, CONFIG)
    entry = quant["tensors"]["blocks.0.mlp.fc1.indices"]
    assert entry == {"shape": [packed_nbytes(512 * 128 // 2, 5)], "dtype": "uint8"}
    assert quant["tensors"]["blocks.0.mlp.fc1.codebook"]["dtype"] == "float16"
    assert quant["tensors"]["blocks.0.mlp.fc1.bias"]["dtype"] == "float32"
    assert quant["tensors"]["final_layer.linear.weight"]["dtype"] == "float32"
    layer = quant["layers"]["blocks.0.mlp.fc1"]
    assert (layer["class"], layer["k"], layer["d"], layer["n"], layer["groups"]) == ("VQLinear", 32, 2, 2, 1)
    assert layer["bits_per_weight"] == 2.5


def test_soft_layers_cannot_be_saved(tmp_path):
    torch.manual_seed(0)
    model = DiT.from_config(LEGACY)
    quantize_linears(model, CodebookSpec(16, 4, kmeans_iters=1), progress=False)
    with pytest.raises(UserError, match="still soft"):
        save_quantized(model, REF, tmp_path, CONFIG)
    assert not os.path.exists(tmp_path / "quant_config.json")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifact")
    save_quantized(quantized_model(), REF, d, CONFIG)
    return d


def as_format_1(d):
    """quant_config.json as format 1 wrote it: the DiT's registry fields as base_model, no digests."""
    q = json.loads((d / QUANT_FILE).read_text())
    legacy = {"format_version": 1, "base_model": LEGACY, "layers": q["layers"], "tensors": q["tensors"],
              "model_bytes": q["model_bytes"]}
    (d / QUANT_FILE).write_text(json.dumps(legacy, indent=1))


@pytest.mark.parametrize("kind", [dict(k=12, d=2), dict(rtn_bits=3)])
def test_format_1_artifacts_load(tmp_path, kind):
    model = quantized_model(**kind)
    save_quantized(model, REF, tmp_path, CONFIG)
    as_format_1(tmp_path)
    loaded, ref, quant = load_quantized(tmp_path)
    assert ref == {"class": "vq4dit.models.dit.DiT", "config": LEGACY} and quant["format_version"] == 1
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 2])
    assert torch.equal(model(x, t, y), loaded(x, t, y))


def edit_config(d, edit, sign=True):
    """Edit quant_config.json; sign=True records the new content digest, as a tool rewriting it would."""
    q = json.loads((d / QUANT_FILE).read_text())
    edit(q)
    if sign:
        write_quant_config(d, q)
    else:
        (d / QUANT_FILE).write_text(json.dumps(q, indent=1))


def rewrite_model(d, edit, record=True):
    """Rewrite model.safetensors with edited tensors and (record=True) its new size and sha256 in quant_config.json:
    a consistent artifact with wrong content, which the checks behind the digests must still refuse."""
    path = d / MODEL_FILE
    tensors = {k: v.clone() for k, v in load_file(path).items()}  # copies: the file is overwritten below
    edit(tensors)
    save_file(tensors, path, metadata={"format": "vq4dit-quantized"})
    if record:
        edit_config(d, lambda q: q.update(model_bytes=os.path.getsize(path), model_sha256=file_sha256(path)))


def corrupt_missing_marker(d):
    os.remove(d / QUANT_FILE)


def corrupt_json(d):
    (d / QUANT_FILE).write_text("{not json")


def corrupt_version(d):
    edit_config(d, lambda q: q.update(format_version=99), sign=False)


def corrupt_unsigned_edit(d):  # a plausible value changed by hand: only the digest tells
    edit_config(d, lambda q: q["layers"]["blocks.1.attn.proj"].update(bits_per_weight=3.0), sign=False)


def corrupt_digest_removed(d):
    edit_config(d, lambda q: q.pop("content_sha256"), sign=False)


def corrupt_shape(d):
    edit_config(d, lambda q: q["tensors"]["pos_embed"]["shape"].__setitem__(1, 17))


def corrupt_layer_meta(d):
    edit_config(d, lambda q: q["layers"]["blocks.1.attn.proj"].update(k=8))


def corrupt_untrusted_class(d):
    edit_config(d, lambda q: q["base_model"].update({"class": "os.system"}))


def corrupt_base_config(d):
    edit_config(d, lambda q: q["base_model"]["config"].update(hidden_size=64, num_heads=2))


def corrupt_layer_name(d):
    def rename(q):
        q["layers"]["blocks.7.mlp.fc1"] = q["layers"].pop("blocks.0.mlp.fc1")
        for suffix in ("indices", "codebook", "bias"):
            q["tensors"][f"blocks.7.mlp.fc1.{suffix}"] = q["tensors"].pop(f"blocks.0.mlp.fc1.{suffix}")
    rewrite_model(d, lambda t: [t.__setitem__(f"blocks.7.mlp.fc1.{s}", t.pop(f"blocks.0.mlp.fc1.{s}"))
                                for s in ("indices", "codebook", "bias")])
    edit_config(d, rename)


def corrupt_flipped_byte(d):
    raw = bytearray((d / MODEL_FILE).read_bytes())
    raw[-5] ^= 0x10  # one bit of the last tensor's data: any value is a valid float
    (d / MODEL_FILE).write_bytes(bytes(raw))


def corrupt_truncate(d):
    data = (d / MODEL_FILE).read_bytes()
    (d / MODEL_FILE).write_bytes(data[:len(data) // 2])


def corrupt_truncate_and_record_size(d):  # a truncated file whose recorded size was "fixed" too
    corrupt_truncate(d)
    edit_config(d, lambda q: q.update(model_bytes=os.path.getsize(d / MODEL_FILE)))


def corrupt_truncate_and_record_all(d):  # ... and its sha256: the file itself must be refused
    rewrite_model(d, lambda t: None, record=False)
    corrupt_truncate(d)
    path = d / MODEL_FILE
    edit_config(d, lambda q: q.update(model_bytes=os.path.getsize(path), model_sha256=file_sha256(path)))


def corrupt_nan(d):  # same names, shapes and byte size, one weight NaN
    rewrite_model(d, lambda t: t["final_layer.linear.bias"].__setitem__(0, float("nan")))


def corrupt_missing_tensor(d):  # a tensor absent from the file and from quant_config.json alike
    rewrite_model(d, lambda t: t.pop("final_layer.linear.bias"))
    edit_config(d, lambda q: q["tensors"].pop("final_layer.linear.bias"))


@pytest.mark.parametrize("corrupt,file,match", [
    (corrupt_missing_marker, QUANT_FILE, "missing"),
    (corrupt_json, QUANT_FILE, "malformed"),
    (corrupt_version, QUANT_FILE, "format_version 99 is newer"),
    (corrupt_unsigned_edit, QUANT_FILE, "content does not match its content_sha256"),
    (corrupt_digest_removed, QUANT_FILE, "malformed .*content_sha256"),
    (corrupt_shape, MODEL_FILE, "tensor pos_embed is"),
    (corrupt_layer_meta, QUANT_FILE, "blocks.1.attn.proj.indices is listed"),
    (corrupt_untrusted_class, QUANT_FILE, "model class 'os.system' is not allowed"),
    (corrupt_base_config, MODEL_FILE, "does not fit vq4dit.models.dit.DiT"),
    (corrupt_layer_name, QUANT_FILE, "layer blocks.7.mlp.fc1 does not exist in vq4dit.models.dit.DiT"),
    (corrupt_flipped_byte, MODEL_FILE, "sha256 differs"),
    (corrupt_truncate, MODEL_FILE, "truncated"),
    (corrupt_truncate_and_record_size, MODEL_FILE, "sha256 differs"),
    (corrupt_truncate_and_record_all, MODEL_FILE, "unreadable"),
    (corrupt_nan, MODEL_FILE, "final_layer.linear.bias holds 1 NaN/Inf"),
    (corrupt_missing_tensor, MODEL_FILE, r"does not fit vq4dit.models.dit.DiT "
     r"\(missing: \[.final_layer.linear.bias.\]"),
])
def test_integrity_errors_name_the_file(saved, tmp_path, corrupt, file, match):
    tmp_path = tmp_path / "copy"
    shutil.copytree(saved, tmp_path)
    corrupt(tmp_path)
    with pytest.raises(UserError, match=match) as err:
        load_quantized(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / file) in msg and "\n" not in msg


def test_index_beyond_a_non_power_of_two_codebook_is_refused(tmp_path):
    """k = 12 stores 4-bit indices, so a corrupt file can hold 12..15: refused on load, not an IndexError later."""
    save_quantized(quantized_model(k=12, d=2), REF, tmp_path, CONFIG)
    load_quantized(tmp_path)  # intact: loads
    rewrite_model(tmp_path, lambda t: t["blocks.0.mlp.fc2.indices"].__setitem__(3, 0xFF))  # two 4-bit 15s
    with pytest.raises(UserError, match="layer blocks.0.mlp.fc2: codeword index 15 out of range for k=12"):
        load_quantized(tmp_path)
