"""The statistics every calibration mode reports: errors of a quantized model against its full-precision teacher
(computed in chunks, no stored activations), weight errors, and the per-block and per-layer stats records."""
import torch

from vq4dit.calib.capture import call_on
from vq4dit.calib.chunks import chain_chunk
from vq4dit.calib.problem import layers_of
from vq4dit.calib.replay import run_chain, squared_error
from vq4dit.calib.train import argmax_assignment


@torch.no_grad()
def chain_errors(blocks, teacher_blocks, cset, device, chunk=None):
    """Per-block output error (list of floats) of `blocks` fed by themselves vs `teacher_blocks` fed by themselves,
    both from the recorded slots of the calibration set `cset`: the error a sampler would see; in chunks of `chunk`
    rows (None: as many as the evaluation budget holds for both chains at once, calib/chunks.py)."""
    totals, counts = [0.0] * len(blocks), [0] * len(blocks)
    chunk = chunk or chain_chunk(cset, copies=2)
    for s in range(0, cset.rows, chunk):
        rows = slice(s, min(s + chunk, cset.rows))
        outs = run_chain(blocks, cset, rows, device)
        refs = run_chain(teacher_blocks, cset, rows, device)
        for i, (o, r) in enumerate(zip(outs, refs)):
            err, n = squared_error(o, r)
            totals[i] += err.item()
            counts[i] += n
    return [t / n for t, n in zip(totals, counts)]


@torch.no_grad()
def prediction_mse(model, teacher, adapter, calls, device):
    """MSE of the model's prediction (adapter.prediction, e.g. DiT's noise channels) against the teacher's, over
    recorded model calls [(args, kwargs)] (calib.capture.capture_model_inputs)."""
    total, count = 0.0, 0
    for call in calls:
        args, kwargs = call_on(call, device)
        out = adapter.prediction(model, model(*args, **kwargs))
        ref = adapter.prediction(teacher, teacher(*args, **kwargs))
        total += (out.float() - ref.float()).pow(2).sum().item()
        count += out.numel()
    return total / count


@torch.no_grad()
def weight_mse(layer, fp_weight):
    """Mean squared error of a quantized layer's reconstructed weight against the FP weight (out, in)."""
    return (layer.weight().float() - fp_weight.to(layer.codebook.device).float()).pow(2).mean().item()


def layer_stats(layers, info, w_before, fp_weights):
    """{name: selection outcome and weight MSE vs FP before/after} for layers {name: VQLinear} in `train` order."""
    return {name: {"selected": info["selected"][j], "hardened_at": info["hardened_at"][j],
                   "weight_mse_before": w_before[j], "weight_mse_after": weight_mse(layer, fp_weights[name])}
            for j, (name, layer) in enumerate(layers.items())}


def errors_before(problem, cset):
    """The errors calibration starts from: per-block chain errors and per-layer weight MSE at the argmax (= k-means
    nearest) assignment."""
    modules = list(problem.layers.values())
    with argmax_assignment(modules):
        return {"mse": chain_errors([m for _, m in problem.blocks], problem.teacher_blocks, cset, problem.device),
                "weight": [weight_mse(layer, problem.fp_weights[n]) for n, layer in problem.layers.items()]}


def block_stats(problem, info, before, after, **extra):
    """Per-block stats of a run that trained every layer at once (joint, online)."""
    per_layer = layer_stats(problem.layers, info, before["weight"], problem.fp_weights)
    return [{"block": i, "name": name, "mse_before": before["mse"][i], "mse_after": after[i], "loss": info["loss"],
             "penalty": info["penalty"], **extra, "layers": layers_of(per_layer, name)}
            for i, (name, _) in enumerate(problem.blocks)]
