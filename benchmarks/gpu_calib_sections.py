"""benchmarks/gpu_check.py's sections on what quantizing costs on a GPU: one calibration update of a Flux-dev and a
DiT-XL/2 block (flux_step, dit_step), the soft weight's forward and backward (soft_weight) and the codebook fit
(kmeans). Each section is fn(sizes, device, report) and adds its rows and facts to the report.
"""
import dataclasses
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.gpu_measure import SMOKE, median_seconds, peak_gib, reset_peak, sync
from vq4dit.calib.config import CalibConfig
from vq4dit.calib.micro import micro_losses
from vq4dit.calib.train import Trainer
from vq4dit.models.dit import DiTBlock
from vq4dit.vq import candidates, nearest
from vq4dit.vq.apply import quantize_linears
from vq4dit.vq.layer import CodebookSpec, VQLinear

W2 = CodebookSpec(codebook_size=256, dim=4, candidates=2, kmeans_iters=100)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)


def flux_block(sizes, device):
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    return FluxTransformerBlock(sizes.flux_dim, sizes.flux_heads, sizes.flux_dim // sizes.flux_heads).to(device)


def flux_call(sizes, batch, device):
    """(block -> the block's outputs (B, T_text + T_image, D)) on random inputs of `batch` rows."""
    head = sizes.flux_dim // sizes.flux_heads
    tokens = sizes.flux_text_tokens + sizes.flux_image_tokens
    hidden = torch.randn(batch, sizes.flux_image_tokens, sizes.flux_dim, device=device)
    text = torch.randn(batch, sizes.flux_text_tokens, sizes.flux_dim, device=device)
    temb = torch.randn(batch, sizes.flux_dim, device=device)
    angles = torch.randn(tokens, head, device=device)
    rotary = (angles.cos(), angles.sin())

    def call(block, rows=slice(None)):
        text_out, image_out = block(hidden_states=hidden[rows], encoder_hidden_states=text[rows], temb=temb[rows],
                                    image_rotary_emb=rotary)
        return torch.cat([text_out, image_out], dim=1)

    return call


def dit_call(sizes, batch, device):
    x = torch.randn(batch, sizes.dit_tokens, sizes.dit_hidden, device=device)
    c = torch.randn(batch, sizes.dit_hidden, device=device)
    return lambda block, rows=slice(None): block(x[rows], c[rows])


def syncs_in(update, device):
    """"none" when update() runs without a host synchronisation (CUDA's sync debug mode raises at the first one),
    else the first one's message; "n/a" off CUDA."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        update()
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def update_row(name, block, call, device, dtype, batch, micro_batch=None):
    """One calibration update of `block` (soft VQ Linears): forward under autocast `dtype`, MSE to a fixed target,
    the Trainer's backward and RMSprop step (micro_batch: the `batch` rows in micro-batches of that many, gradients
    accumulated). -> row of seconds, peak GiB, FLOPs, TFLOP/s, host synchronisations inside an update."""
    layers = [m for m in block.modules() if isinstance(m, VQLinear)]
    trainer = Trainer(layers, CalibConfig(select_every=10 ** 6))  # no selection: every update the same work
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.no_grad(), autocast:
        target = call(block).float()

    def loss_fn(rows):
        with autocast:
            out = call(block, rows)
        return nn.functional.mse_loss(out.float(), target[rows])

    def update():
        if micro_batch is None:
            trainer.step(loss_fn(slice(None)))
        else:
            trainer.step(micro_losses(loss_fn, torch.arange(batch, device=device), micro_batch))

    with FlopCounterMode(display=False) as counter:
        with autocast:
            nn.functional.mse_loss(call(block).float(), target).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    reset_peak(device)
    seconds = median_seconds(update, device, repeats=5)
    flops = counter.get_total_flops()
    return {"case": name, "dtype": dtype, "micro-batch": micro_batch or "", "s/update": round(seconds, 4),
            "peak GiB": peak_gib(device), "GFLOP/update": float(f"{flops / 1e9:.3g}"),
            "TFLOP/s": float(f"{flops / seconds / 1e12:.3g}"), "host syncs in an update": syncs_in(update, device)}


def soft_block(block, sizes):
    spec = dataclasses.replace(W2, kmeans_iters=sizes.kmeans_iters)
    quantize_linears(block, spec, include=r".", progress=False)
    return block


def section_flux_step(sizes, device, report):
    block = soft_block(flux_block(sizes, device), sizes)
    for batch in sizes.flux_batches:
        call = flux_call(sizes, batch, device)
        for dtype in ("fp32", "bf16"):
            for micro in (None, 1) if batch == max(sizes.flux_batches) else (None,):
                row = update_row("Flux-dev double block", block, call, device, dtype, batch, micro)
                report.add_row("flux_step", {"batch": batch, **row})
    del block


def section_dit_step(sizes, device, report):
    torch.manual_seed(0)
    block = soft_block(DiTBlock(sizes.dit_hidden, sizes.dit_heads).to(device), sizes)
    call = dit_call(sizes, sizes.dit_batch, device)
    for dtype in ("fp32", "bf16"):
        row = update_row(f"{sizes.dit_model} block", block, call, device, dtype, sizes.dit_batch)
        row["s/block at 500 updates"] = round(500 * row["s/update"], 1)
        report.add_row("dit_step", {"batch": sizes.dit_batch, **row})


def section_soft_weight(sizes, device, report):
    torch.manual_seed(0)
    out, inp = 4 * sizes.flux_dim, sizes.flux_dim
    n_sub = out * inp // W2.dim
    codebook = torch.randn(1, W2.codebook_size, W2.dim, device=device, requires_grad=True)
    cands = torch.randint(0, W2.codebook_size, (n_sub, W2.candidates), device=device, dtype=torch.uint8)
    logits = torch.randn(n_sub, W2.candidates, device=device, requires_grad=True)
    upstream = torch.randn(n_sub, W2.dim, device=device)
    results = {}
    forms = (("einsum (before)", False, "index_add"), ("one pass, codebook grad by index_add", True, "index_add"),
             ("one pass, codebook grad by sorted sums", True, "sorted"))
    for form, one_pass, method in forms:
        def forward_backward(one_pass=one_pass, method=method):
            w = candidates.soft_reconstruct(codebook, cands, torch.softmax(logits, 1), one_pass, method)
            (w * upstream).sum().backward()
            return w

        reset_peak(device)
        ms = 1e3 * median_seconds(forward_backward, device, repeats=10)
        codebook.grad = logits.grad = None
        results[form] = forward_backward().detach(), codebook.grad.clone(), logits.grad.clone()
        codebook.grad = logits.grad = None
        report.add_row("soft_weight", {"layer": f"{out} x {inp}", "form": form, "fwd+bwd ms": round(ms, 2),
                                       "peak GiB": peak_gib(device)})
    before = results.pop(forms[0][0])
    for form, after in results.items():
        report.facts[f"soft weight, {form} vs einsum: largest relative difference (weight, codebook grad, ratio "
                     "grad)"] = [float(f"{((a - b).abs().max() / b.abs().max()).item():.2g}")
                                 for a, b in zip(after, before)]


def flux_block_shapes(sizes):
    """{(out, in): count} over the Linears of Flux-dev's blocks (meta device; the smoke run scales the width)."""
    from diffusers import FluxTransformer2DModel

    config = dict(FLUX_DEV)
    if sizes is SMOKE:
        config.update(num_layers=2, num_single_layers=2, attention_head_dim=sizes.flux_dim // sizes.flux_heads,
                      num_attention_heads=sizes.flux_heads, joint_attention_dim=32, pooled_projection_dim=16)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "transformer_blocks." in name:
            shapes[(m.out_features, m.in_features)] = shapes.get((m.out_features, m.in_features), 0) + 1
    return shapes


def section_kmeans(sizes, device, report):
    spec = dataclasses.replace(W2, kmeans_iters=sizes.kmeans_iters)
    total = 0.0
    for (out, inp), count in sorted(flux_block_shapes(sizes).items()):
        linear = nn.Linear(inp, out, device=device)
        sync(device)
        start = time.perf_counter()
        VQLinear.from_linear(linear, spec, soft=True)
        sync(device)
        seconds = time.perf_counter() - start
        total += count * seconds
        report.add_row("kmeans", {"shape (out, in)": f"{out} x {inp}", "layers": count, "s/layer": round(seconds, 2),
                                  "s total": round(count * seconds, 1)})
    report.facts["k-means + candidates, all Flux-dev block Linears (s)"] = round(total, 1)
    linear = nn.Linear(sizes.flux_dim, sizes.flux_dim, device=device)
    default = nearest.GPU_CHUNK_ELEMENTS
    for label, elements in (("4096-row blocks (before)", 0), ("large blocks", default)):
        nearest.GPU_CHUNK_ELEMENTS = elements
        try:
            sync(device)
            start = time.perf_counter()
            VQLinear.from_linear(linear, spec, soft=True)
            sync(device)
        finally:
            nearest.GPU_CHUNK_ELEMENTS = default
        report.add_row("kmeans_blocks", {"shape (out, in)": f"{sizes.flux_dim} x {sizes.flux_dim}",
                                         "distance blocks": label, "s/layer": round(time.perf_counter() - start, 2)})

