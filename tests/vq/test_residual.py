"""ResidualVQLinear against slow per-stage references: its weight, its fit in turn, its soft start and training, its
output-aware refit, its decode plan, and its codec (exact storage, save -> load -> save)."""
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.vq.test_artifact import CONFIG, LEGACY, REF
from vq4dit.calib.config import CalibConfig
from vq4dit.calib.train import Trainer
from vq4dit.models.dit import DiT
from vq4dit.vq.apply import quantize_linears
from vq4dit.vq.artifact import MODEL_FILE, load_quantized, save_quantized
from vq4dit.vq.codecs import CODECS
from vq4dit.vq.layer import CodebookSpec, VQLinear
from vq4dit.vq.packing import index_bits, packed_nbytes
from vq4dit.vq.residual import ResidualVQLinear


def linear(in_f=16, out_f=24, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def reference_weight(layer):
    """Loop over stages and sub-vectors: stage s's sub-vector i (row-major, d inputs of one row) reads codebook
    s * G + its row group; the weight adds the stages."""
    d, n_sub = layer.dim, layer.out_features * layer.in_features // layer.dim
    per_group = n_sub // layer.groups
    total = torch.zeros(n_sub, d)
    for s in range(layer.stages):
        for i in range(n_sub):
            j = s * n_sub + i
            cb = layer.codebook[s * layer.groups + i // per_group]
            if layer.is_hard:
                total[i] += cb[int(layer.indices[j])]
            else:
                r = layer.ratios()[j]
                total[i] += sum(r[c] * cb[int(layer.candidates[j, c])] for c in range(layer.num_candidates))
    return total.reshape(layer.out_features, layer.in_features)


def relative_error(layer, lin):
    w = lin.weight.detach()
    return ((layer.weight() - w).pow(2).sum() / w.pow(2).sum()).item()


@pytest.mark.parametrize("stages,groups,n", [(2, 1, 2), (3, 3, 2), (2, 3, 1)])
def test_weight_is_the_sum_of_the_stages(stages, groups, n):
    """Soft and hard weight, and the forward, against the per-stage loop (mutation: weight() keeps stage 0 only, or
    reads every stage from stage 0's codebooks -> fails)."""
    layer = ResidualVQLinear.from_linear(linear(), CodebookSpec(8, 4, candidates=n, kmeans_iters=5, stages=stages),
                                         groups=groups)
    assert layer.codebook.shape == (stages * groups, 8, 4) and layer.candidates.shape == (stages * 96, n)
    with torch.no_grad():
        layer.logits.normal_()  # ratios away from one-hot: each candidate counts
    assert torch.allclose(layer.weight(), reference_weight(layer), atol=1e-6)
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), F.linear(x, layer.weight(), layer.bias), atol=1e-6)
    layer.harden()
    assert torch.allclose(layer.weight(), reference_weight(layer), atol=1e-6)


def test_stage_one_is_the_plain_layer_and_stage_two_fits_what_it_leaves():
    """One stage is VQLinear.from_linear exactly (same seeds); the second stage, k-means of the residual, cuts the
    relative weight error several-fold (mutation: stage 2 fitted to W instead of W - stage 1 -> the two stages
    add up to about 2W and the error grows, fails)."""
    lin = linear(32, 48)
    spec = CodebookSpec(16, 4, candidates=1, kmeans_iters=20)
    plain = VQLinear.from_linear(lin, spec, seed=3, soft=False)
    one = ResidualVQLinear.from_linear(lin, CodebookSpec(16, 4, candidates=1, kmeans_iters=20, stages=1), seed=3,
                                       soft=False)
    two = ResidualVQLinear.from_linear(lin, CodebookSpec(16, 4, candidates=1, kmeans_iters=20, stages=2), seed=3,
                                       soft=False)
    assert torch.equal(one.weight(), plain.weight())
    assert torch.equal(two.codebook[0], plain.codebook[0]) and torch.equal(two.indices[:384], plain.indices)
    assert relative_error(two, lin) < 0.4 * relative_error(plain, lin)


def test_the_soft_start_is_the_hard_layer():
    """from_linear soft equals hard then soften_; its argmax (every sub-vector frozen) is the hard layer, also after
    an output-aware refit where the stages' codewords are not each other's nearest (mutation: soften_ takes the
    codewords nearest to each stage's target instead of keeping the current ones -> the argmax changes, fails)."""
    lin = linear()
    spec = CodebookSpec(8, 4, candidates=2, kmeans_iters=5, stages=2)
    soft = ResidualVQLinear.from_linear(lin, spec)
    hard = ResidualVQLinear.from_linear(lin, spec, soft=False)
    x = torch.randn(64, 16)
    hard.fit_outputs_(lin.weight, x.T @ x / len(x), seed=0)
    for h in (ResidualVQLinear.from_linear(lin, spec, soft=False), hard):
        start, indices = h.weight(), h.indices.clone()
        h.soften_(lin.weight, 2)
        assert torch.equal(h.candidates[:, 0], indices)
        with torch.no_grad():
            h.frozen.fill_(True)
            assert torch.equal(h.weight(), start)
    assert torch.equal(soft.candidates, ResidualVQLinear.from_linear(lin, spec, soft=False).soften_(
        lin.weight, 2).candidates)


def test_calibration_trains_every_stage_and_lowers_the_output_error():
    """The Trainer (calib/train.py) on a soft residual layer alone, full batch: the output error against the FP
    layer halves, and every stage's ratio logits and codebook move (mutation: the soft weight reads stage 0 only
    -> stage 2 gets no gradient, fails)."""
    lin = linear(32, 32)
    layer = ResidualVQLinear.from_linear(lin, CodebookSpec(16, 4, candidates=2, kmeans_iters=5, stages=2))
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = lin(x)
    logits, codebook = layer.logits.detach().clone().view(2, -1, 2), layer.codebook.detach().clone()
    trainer = Trainer([layer], CalibConfig(iters=40, lambda_r=0.0, select_every=10**6))
    losses = []
    for _ in range(40):
        losses.append((layer(x) - target).pow(2).mean())
        trainer.step(losses[-1])
    assert losses[-1].item() < 0.7 * losses[0].item()
    assert (layer.logits.detach().view(2, -1, 2) != logits).flatten(1).any(1).all()  # (S,): every stage's ratios
    assert (layer.codebook.detach() != codebook).flatten(1).any(1).all()  # (S*G,): every stage's codebook


def test_output_aware_refit_lowers_the_output_error():
    """fit_outputs_ (weighted k-means of each stage's target, one GPTQ sweep assigning every stage, each stage's
    codebook refit) lowers tr(dW H dW^T) well below the k-means start (mutations: a stage's codebook refit to W
    instead of its target, or each stage assigned in its own sweep to W -> fails)."""
    lin = linear(32, 32)
    layer = ResidualVQLinear.from_linear(lin, CodebookSpec(16, 4, candidates=1, kmeans_iters=10, stages=2),
                                         soft=False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 32, generator=gen) * torch.linspace(0.1, 3, 32)  # uneven input scales
    h = x.T @ x / len(x)  # (in, in) E[x x^T]

    def output_error():
        dw = layer.weight() - lin.weight.detach()
        return torch.trace(dw @ h @ dw.T).item()

    before = output_error()
    layer.fit_outputs_(lin.weight, h, seed=0)
    assert output_error() < 0.9 * before


def test_decode_plan_equals_the_weight():
    """The inference forward (workspace decode plan: gather the stages, then sum) equals F.linear with weight(), in
    float32 and bfloat16 (mutation: the plan sums stage 0 only -> fails)."""
    layer = ResidualVQLinear.from_linear(linear(), CodebookSpec(8, 4, candidates=1, kmeans_iters=5, stages=3),
                                         groups=3, soft=False)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 16, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight(dtype), layer.bias.to(dtype)))
    assert not layer.has_fused_kernel and layer.bits_per_weight() == 3 * 3 / 4


def residual_model(stages=2, k=16, d=4, split_qkv=False):
    torch.manual_seed(0)
    model = DiT.from_config(LEGACY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layers = quantize_linears(model, CodebookSpec(k, d, kmeans_iters=2, stages=stages), include=r"^blocks\.0\.",
                              split_qkv=split_qkv, progress=False)
    for layer in layers.values():
        layer.harden()
    return model.eval()


@pytest.mark.parametrize("stages,k,split_qkv", [(2, 16, False), (3, 32, True)])
def test_codec_stores_every_stage_exactly(tmp_path, stages, k, split_qkv):
    """Each layer stores stages x N indices at ceil(log2 k) bits in one packed tensor and a (stages x G, k, d) fp16
    codebook: the file's tensors are exactly the codec's tensor_specs; load gives the same outputs, and saving the
    loaded model gives the same bytes (mutation: the codec unpacks one stage's indices -> load fails)."""
    model = residual_model(stages, k, split_qkv=split_qkv)
    quant = save_quantized(model, REF, tmp_path / "a", CONFIG)
    name = "blocks.0.attn.qkv"
    entry = quant["layers"][name]
    groups = 3 if split_qkv else 1
    assert (entry["class"], entry["stages"], entry["groups"]) == ("ResidualVQLinear", stages, groups)
    specs = CODECS["ResidualVQLinear"].tensor_specs(entry)
    assert specs["indices"][0] == (packed_nbytes(stages * 384 * 128 // 4, index_bits(k)),)
    assert specs["codebook"] == ((stages * groups, k, 4), torch.float16)
    for layer_name, e in quant["layers"].items():
        for suffix, (shape, dtype) in CODECS["ResidualVQLinear"].tensor_specs(e).items():
            stored = quant["tensors"][f"{layer_name}.{suffix}"]
            assert stored == {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    assert entry["bits_per_weight"] == stages * index_bits(k) / 4
    loaded, ref, _ = load_quantized(tmp_path / "a")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    save_quantized(loaded, ref, tmp_path / "b", CONFIG)
    digest = [hashlib.sha256((tmp_path / d / MODEL_FILE).read_bytes()).hexdigest() for d in ("a", "b")]
    assert digest[0] == digest[1]


def test_lora_branch_beside_a_residual_layer():
    """PEFT's LoRA over a ResidualVQLinear (vq/lora.py maps every QuantLinear): the summed stages (decode plan) plus
    scale * B A x, equal to the per-stage reference plus the branch by hand (mutation: the plan sums stage 0 only, or
    PEFT's wrapper reads the layer's size as S x out -> fails)."""
    from peft import LoraConfig, inject_adapter_in_model

    from vq4dit.vq.lora import enable_peft_lora

    enable_peft_lora()
    layer = ResidualVQLinear.from_linear(linear(16, 12), CodebookSpec(8, 4, candidates=1, kmeans_iters=3, stages=2),
                                         soft=False)
    model = nn.Sequential(layer)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False), model)
    x = torch.randn(5, 16)
    lora_a, lora_b = model[0].lora_A["default"].weight, model[0].lora_B["default"].weight
    with torch.no_grad():
        want = F.linear(x, reference_weight(layer), layer.bias) + 2.0 * F.linear(F.linear(x, lora_a), lora_b)
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)


def test_the_skeleton_another_process_fills_has_the_fitted_layer_shapes():
    """Under torchrun a layer fitted by another rank starts as vq.apply.unfitted and receives the codebook and
    indices by broadcast: its tensors must have the fitted residual layer's shapes and dtypes (mutation: unfitted
    builds a one-stage VQLinear -> fails)."""
    from vq4dit.vq.apply import unfitted

    lin, spec = linear(), CodebookSpec(8, 4, candidates=2, kmeans_iters=2, stages=2)
    fitted, skeleton = ResidualVQLinear.from_linear(lin, spec, groups=3, soft=False), unfitted(lin, spec, 3)
    assert type(skeleton) is ResidualVQLinear
    assert {k: (v.shape, v.dtype) for k, v in skeleton.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in fitted.state_dict().items()}


def test_offload_hooks_and_compiled_tracing_keep_the_outputs():
    """accelerate's sequential offload hooks (every tensor of the layer leaves it between calls) and torch.compile's
    tracing (aot_eager: the traced decode, index_select and the stages' sum) give the eager outputs (mutation: the
    traced branch of weight() keeps stage 0 only -> fails)."""
    from accelerate import cpu_offload

    layer = ResidualVQLinear.from_linear(linear(), CodebookSpec(8, 4, candidates=1, kmeans_iters=2, stages=2),
                                         soft=False)
    model, x = nn.Sequential(layer), torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), want, rtol=1e-6, atol=1e-6)
        cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=True)
        assert layer.indices.device.type == "meta"  # offloaded between calls
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
