"""Input second moments E[x x^T] of a block's Linears over the calibration points, for output-aware codebooks.

A Linear's output error under a weight error dW is E||dW x||^2 = tr(dW H dW^T), H = E[x x^T] (vq/weighted_kmeans.py).
The block-wise walk measures H for the layers of block i on the inputs block i trains on (the quantized chain's,
in sequential mode) with forward pre-hooks on the FP teacher block: one extra forward sweep, no stored activations.
"""
import torch

from vq4dit.calib.replay import sweep
from vq4dit.vq.weighted_kmeans import InputMoments


@torch.no_grad()
def block_input_moments(block, prefix, names, replay, device):
    """{qualified name: (in, in) float64 E[x x^T]} of the Linears `names` (qualified, under `prefix` + ".") of the
    FP `block`, over every row that `replay` gives it."""
    accs, handles = {}, []
    for name in names:
        module = block.get_submodule(name[len(prefix) + 1:])
        acc = accs[name] = InputMoments(module.in_features, None, full=True, device=device)
        handles.append(module.register_forward_pre_hook(lambda _, args, acc=acc: acc.add(args[0])))
    try:
        sweep(block, replay, device)
    finally:
        for h in handles:
            h.remove()
    return {name: acc.full() for name, acc in accs.items()}
