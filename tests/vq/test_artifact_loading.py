"""How an artifact becomes a model (issue 10 items 1 and 2): skeleton on meta, the file's tensors assigned rather
than copied, indices kept in their small dtype, and a forward that decodes one layer's weight at a time."""
import re
import weakref

import pytest
import torch

import vq4dit.vq.artifact as artifact
import vq4dit.vq.qlinear as qlinear
from tests.conftest import randomize
from tests.vq.test_artifact import CONFIG, LEGACY, REF
from vq4dit.models.dit import DiT
from vq4dit.vq.apply import BLOCK_LINEARS, quantize_linears_rtn, set_submodule
from vq4dit.vq.kernels.decode import release_workspace, workspace_tensors
from vq4dit.vq.layer import VQLinear
from vq4dit.vq.packing import index_dtype
from vq4dit.vq.rtn import RTNLinear

X, T, Y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 900]), torch.tensor(
    [0, 2])


def random_quantized(k=None, d=None, rtn_bits=None):
    """The tiny DiT with every block Linear a hard VQLinear of random codebook and indices (no k-means: fast), or
    RTN-quantized."""
    model = randomize(DiT.from_config(LEGACY))
    if rtn_bits:
        quantize_linears_rtn(model, rtn_bits)
        return model
    gen = torch.Generator().manual_seed(k)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]:
        if re.search(BLOCK_LINEARS, name):
            layer = VQLinear(m.in_features, m.out_features, k, d, hard=True)
            layer.codebook.data.normal_(generator=gen)
            layer.indices.copy_(torch.randint(0, k, layer.indices.shape, generator=gen))
            layer.bias.data.copy_(m.bias)
            set_submodule(model, name, layer)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (artifact dir, quantized model)}: 8-bit indices (stored as they are), 4-bit and 9-bit ones, RTN."""
    out = {}
    for name, kind in {"k256": dict(k=256, d=4), "k16": dict(k=16, d=4), "k512": dict(k=512, d=2),
                       "rtn3": dict(rtn_bits=3)}.items():
        model = random_quantized(**kind)
        d = tmp_path_factory.mktemp(name)
        artifact.save_quantized(model, REF, d, CONFIG)
        out[name] = d, model
    return out


def spy_load(monkeypatch, directory):
    """load_quantized with spies: the skeleton as built, and the tensors as read from model.safetensors."""
    seen = {}

    def build_skeleton(ref, source):
        model = real_build(ref, source)
        seen["skeleton"] = {n: t.device.type for n, t in model.state_dict().items()}
        return model

    def read_tensors(*args, **kwargs):
        tensors = real_read(*args, **kwargs)
        seen["file"] = dict(tensors)
        return tensors

    real_build, real_read = artifact.build_skeleton, artifact.read_tensors
    monkeypatch.setattr(artifact, "build_skeleton", build_skeleton)
    monkeypatch.setattr(artifact, "read_tensors", read_tensors)
    model, _, quant = artifact.load_quantized(directory)
    return model, quant, seen


@pytest.mark.parametrize("name", ["k256", "k16", "rtn3"])
def test_skeleton_on_meta_and_the_files_tensors_assigned(saved, monkeypatch, name):
    """Catches building the full-precision model first (today's loader) and copying into it (load_state_dict
    without assign): either way the model's tensors would not be the file's."""
    directory, original = saved[name]
    model, quant, seen = spy_load(monkeypatch, directory)
    assert set(seen["skeleton"].values()) == {"meta"}  # the DiT has no buffers outside its state dict
    state, layers = model.state_dict(), quant["layers"]
    full_precision = [k for k in seen["file"] if not k.startswith(tuple(f"{n}." for n in layers))]
    assert "blocks.0.attn.qkv.indices" not in full_precision and "pos_embed" in full_precision
    for key in full_precision + [k for k in seen["file"] if k.endswith(".bias")]:
        assert state[key].data_ptr() == seen["file"][key].data_ptr(), key
    if name == "k256":  # 8-bit indices are the stored bytes themselves
        for layer in layers:
            assert state[f"{layer}.indices"].data_ptr() == seen["file"][f"{layer}.indices"].data_ptr()
    assert not any(t.is_meta for t in state.values())
    assert torch.equal(model(X, T, Y), original(X, T, Y))


@pytest.mark.parametrize("name, dtype", [("k256", torch.uint8), ("k16", torch.uint8), ("k512", torch.int16),
                                         ("rtn3", torch.uint8)])
def test_indices_load_in_their_in_memory_dtype(saved, name, dtype):
    """Catches unpacking to int64 (1.35 GB for DiT-XL/2 at W2 instead of 169 MB)."""
    model, _, quant = artifact.load_quantized(saved[name][0])
    codes = {n: b for n, b in model.named_buffers() if n.endswith((".indices", ".codes"))}
    assert len(codes) == len(quant["layers"]) == 30
    assert {b.dtype for b in codes.values()} == {dtype}
    k = quant["layers"]["blocks.0.mlp.fc1"].get("k", 8)
    assert dtype == index_dtype(k)


@pytest.mark.parametrize("name", ["k16", "rtn3"])
def test_forward_decodes_one_layer_weight_at_a_time(saved, monkeypatch, name):
    """When a quantized layer's forward starts, no weight decoded by an earlier layer may still be alive, except in
    the one shared workspace buffer (vq/kernels/decode.py) every layer decodes into: the peak extra memory of a
    forward is the largest decoded layer, not all of them (catches a decoded-weight cache)."""
    model, _, _ = artifact.load_quantized(saved[name][0])
    cls = VQLinear if name == "k16" else RTNLinear
    decoded, alive_at_entry = [], []
    real_planned_weight = qlinear.planned_weight

    def planned_weight(layer, *args):
        w = real_planned_weight(layer, *args)
        shared = {b.data_ptr() for b in workspace_tensors()}
        bases = [t for t in (w, w._base) if t is not None and t.data_ptr() not in shared]
        decoded.append([weakref.ref(t) for t in bases])  # a view keeps its base alive
        return w

    def count_alive(module, args):
        alive_at_entry.append(sum(any(r() is not None for r in refs) for refs in decoded))

    monkeypatch.setattr(qlinear, "planned_weight", planned_weight)
    layers = [m for m in model.modules() if isinstance(m, cls)]
    for m in layers:
        m.register_forward_pre_hook(count_alive)
    release_workspace()
    with torch.no_grad():
        out = model(X, T, Y)
    assert len(decoded) == len(layers) == 30 and torch.isfinite(out).all()
    assert alive_at_entry == [0] * 30
    assert not any(r() is not None for refs in decoded for r in refs)
    largest = max(m.in_features * m.out_features for m in layers)
    assert sum(b.numel() * b.element_size() for b in workspace_tensors() if b.is_floating_point()) <= largest * 4


def test_a_tensor_left_on_the_meta_device_is_an_error(saved, monkeypatch):
    """The last guard of load_quantized: with loading itself broken (here: a no-op), no meta tensor gets through."""
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, state, strict=True, assign=False: None)
    with pytest.raises(RuntimeError, match="tensors of vq4dit.models.dit.DiT got no value on load"):
        artifact.load_quantized(saved["k16"][0])
