"""Artifact round trip (bit-identical decoded weights) and integrity checks on load."""
import json
import os
import shutil

import pytest
import torch
import yaml

from models.loading import DiTSpec
from utils.errors import UserError
from vq.apply import quantize_linears
from vq.artifact import load_quantized, save_quantized
from vq.layer import VQLinear
from vq.packing import packed_nbytes
from vq.rtn import RTNLinear, quantize_linears_rtn

SPEC = DiTSpec("DiT-Digits/2", input_size=8, num_classes=3, in_channels=1)
CONFIG = {"method": "kmeans", "wbits": 2}


def quantized_model(k=16, d=4, split_qkv=False, rtn_bits=None):
    torch.manual_seed(0)
    model = SPEC.build()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if rtn_bits:
        quantize_linears_rtn(model, rtn_bits)
    else:
        for layer in quantize_linears(model, k, d, kmeans_iters=2, split_qkv=split_qkv, progress=False).values():
            layer.harden()
    return model.eval()


def decoded(model):
    return {n: m.weight() for n, m in model.named_modules() if isinstance(m, (VQLinear, RTNLinear))}


@pytest.mark.parametrize("kind", [dict(k=256, d=4), dict(k=64, d=2, split_qkv=True), dict(k=32, d=2),
                                  dict(rtn_bits=3)])
def test_round_trip_is_bit_identical(tmp_path, kind):
    model = quantized_model(**kind)
    quant = save_quantized(model, SPEC, tmp_path, CONFIG)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "model.safetensors", "quant_config.json"]
    loaded, spec, quant2 = load_quantized(tmp_path)
    assert spec == SPEC and quant2 == quant
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
    save_quantized(model, SPEC, tmp_path, CONFIG)
    plain, _, _ = load_quantized(tmp_path, decode=True)
    assert not any(isinstance(m, (VQLinear, RTNLinear)) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in plain.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in SPEC.build().modules())
    for name, weight in decoded(model).items():
        assert torch.equal(plain.get_submodule(name).weight, weight)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 2])
    assert torch.equal(model(x, t, y), plain(x, t, y))


def test_overwriting_an_artifact(tmp_path):
    save_quantized(quantized_model(k=16, d=4), SPEC, tmp_path, CONFIG)
    model = quantized_model(k=64, d=2)
    save_quantized(model, SPEC, tmp_path, {"wbits": 3})
    loaded, _, quant = load_quantized(tmp_path)
    assert quant["layers"]["blocks.0.attn.qkv"]["k"] == 64
    assert all(torch.equal(a, b) for a, b in zip(decoded(model).values(), decoded(loaded).values()))


def test_indices_take_exactly_log2_k_bits(tmp_path):
    quant = save_quantized(quantized_model(k=32, d=2), SPEC, tmp_path, CONFIG)
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
    model = SPEC.build()
    quantize_linears(model, 16, 4, kmeans_iters=1, progress=False)
    with pytest.raises(UserError, match="still soft"):
        save_quantized(model, SPEC, tmp_path, CONFIG)
    assert not os.path.exists(tmp_path / "quant_config.json")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifact")
    save_quantized(quantized_model(), SPEC, d, CONFIG)
    return d


def corrupt_missing_marker(d):
    os.remove(d / "quant_config.json")


def corrupt_json(d):
    (d / "quant_config.json").write_text("{not json")


def corrupt_version(d):
    q = json.loads((d / "quant_config.json").read_text())
    q["format_version"] = 99
    (d / "quant_config.json").write_text(json.dumps(q))


def corrupt_shape(d):
    q = json.loads((d / "quant_config.json").read_text())
    q["tensors"]["pos_embed"]["shape"][1] += 1
    (d / "quant_config.json").write_text(json.dumps(q))


def corrupt_layer_meta(d):
    q = json.loads((d / "quant_config.json").read_text())
    q["layers"]["blocks.1.attn.proj"]["k"] = 8
    (d / "quant_config.json").write_text(json.dumps(q))


def corrupt_truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


def corrupt_truncate_and_record(d):  # a truncated file whose recorded size was "fixed" too
    corrupt_truncate(d)
    q = json.loads((d / "quant_config.json").read_text())
    q["model_bytes"] = os.path.getsize(d / "model.safetensors")
    (d / "quant_config.json").write_text(json.dumps(q))


def corrupt_nan(d):  # same names, shapes and byte size, one weight NaN
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(d / "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["final_layer.linear.bias"][0] = float("nan")
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("corrupt,file,match", [
    (corrupt_missing_marker, "quant_config.json", "missing"),
    (corrupt_json, "quant_config.json", "malformed"),
    (corrupt_version, "quant_config.json", "format_version 99 is newer"),
    (corrupt_shape, "model.safetensors", "tensor pos_embed is"),
    (corrupt_layer_meta, "quant_config.json", "blocks.1.attn.proj.indices is listed"),
    (corrupt_truncate, "model.safetensors", "truncated"),
    (corrupt_truncate_and_record, "model.safetensors", "unreadable"),
    (corrupt_nan, "model.safetensors", "final_layer.linear.bias holds 1 NaN/Inf"),
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
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    save_quantized(quantized_model(k=12, d=2), SPEC, tmp_path, CONFIG)
    load_quantized(tmp_path)  # intact: loads
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["blocks.0.mlp.fc2.indices"][3] = 0xFF  # two 4-bit indices of 15
    save_file(tensors, path, metadata=meta)
    with pytest.raises(UserError, match="layer blocks.0.mlp.fc2: codeword index 15 out of range for k=12"):
        load_quantized(tmp_path)
