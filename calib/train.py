"""The optimisation shared by block-wise and joint calibration: RMSprop on ratio logits, codebooks and
biases, the ratio regulariser, and progressive selection (METHOD.md section 3, step 4).

`train(layers, loss_fn, ...)` knows nothing about blocks: `loss_fn(idx)` returns the distillation loss
L_d of the minibatch `idx` (indices into the calibration points) with gradients to the layers.
"""
import contextlib
import logging

import numpy as np
import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

# progressive selection runs every SELECT_EVERY iterations: often enough that a 500-iteration run
# hardens layers gradually, rarely enough that its cost (a softmax over all sub-vectors) is small
SELECT_EVERY = 10


RATIO_PENALTIES = {
    # both are 0 at one-hot ratios and largest at uniform ones; r: (A, n) ratios of the free sub-vectors
    "code": lambda r: r.shape[1] * (r * (1 - r)).mean(),  # the authors' code: n * mean(r (1 - r))
    "paper": lambda r: (1 - (2 * r - 1).abs()).mean(),  # the paper's text: mean(1 - |2r - 1|)
}


def ratio_penalty(layers, form="code"):
    """L_r over the not-yet-frozen sub-vectors of each soft layer (`form`: a key of RATIO_PENALTIES), averaged
    over the soft layers (so lambda_r does not scale with how many layers share one loss).

    Returns a scalar tensor, or None when no layer has a free sub-vector left.
    """
    terms = []
    for layer in layers:
        if layer.is_hard:
            continue
        active = ~layer.frozen  # (N,)
        if not active.any():
            continue
        terms.append(RATIO_PENALTIES[form](torch.softmax(layer.logits[active], dim=1)))  # (A, n) -> ()
    return torch.stack(terms).mean() if terms else None


def param_groups(layers, lr_ratio, lr_codebook):
    """Group 0: ratio logits of the soft layers; group 1: every codebook and bias."""
    logits = [layer.logits for layer in layers if not layer.is_hard]
    rest = [layer.codebook for layer in layers] + [layer.bias for layer in layers if layer.bias is not None]
    return [{"params": logits, "lr": lr_ratio}, {"params": rest, "lr": lr_codebook}]


def drop_hardened(optimizer, layers):
    """Remove the logits of layers hardened since the last call from group 0, with their RMSprop state.

    Codebooks and biases keep their running averages: hardening must not restart their optimisation.
    """
    live = {id(layer.logits) for layer in layers if not layer.is_hard}
    group = optimizer.param_groups[0]
    for p in group["params"]:
        if id(p) not in live:
            optimizer.state.pop(p, None)
    group["params"] = [p for p in group["params"] if id(p) in live]


def progressive_select(layers, threshold, hard_fraction):
    """Freeze confident sub-vectors; harden a layer whose frozen fraction passes `hard_fraction`.

    Returns the positions (in `layers`) of the layers hardened now.
    """
    hardened = []
    for j, layer in enumerate(layers):
        if not layer.is_hard and layer.freeze_confident(threshold) > hard_fraction:
            layer.harden()
            hardened.append(j)
    return hardened


@contextlib.contextmanager
def argmax_assignment(layers):
    """Temporarily evaluate every soft layer at the argmax of its ratios (what hardening would give).

    Before calibration the argmax is the nearest codeword, i.e. the plain k-means quantization, for both
    ratio inits (inverse distance favours the nearest candidate; uniform ties resolve to the first, nearest).
    """
    soft = [layer for layer in layers if not layer.is_hard]
    saved = [layer.frozen.clone() for layer in soft]
    try:
        for layer in soft:
            layer.frozen.fill_(True)
        yield
    finally:
        for layer, frozen in zip(soft, saved):
            layer.frozen.copy_(frozen)


def minibatches(num_points, batch_size, generator):
    """Endless index batches (B,): a fresh seeded permutation per epoch, so each epoch sees every point once."""
    batch_size = min(batch_size, num_points)
    while True:
        perm = torch.randperm(num_points, generator=generator)
        for s in range(0, num_points - batch_size + 1, batch_size):
            yield perm[s:s + batch_size]


def train(layers, loss_fn, num_points, config, generator, progress=True, desc="calibrate", resume=None,
          on_checkpoint=None):
    """Minimise L_d + lambda_r * L_r over `config.iters` minibatches; every layer is hard afterwards.

    layers: list of VQLinear. Returns {"loss": last L_d, "penalty": last L_r (or None),
    "selected": per-layer frozen fraction before the final hardening, "hardened_at": per-layer iteration
    at which progressive selection hardened it (None: hardened at the end)}.
    Checkpoints: every SELECT_EVERY iterations `on_checkpoint(snapshot)` gets {"iteration", "hardened_at",
    "loss", "penalty", "optimizer": optimizer.state_dict()}; passing such a snapshot back as `resume`, with the
    layers restored to their state at that moment and a fresh `generator` of the same seed, continues the run
    exactly where it stopped.
    """
    optimizer = torch.optim.RMSprop(param_groups(layers, config.lr_ratio, config.lr_codebook),
                                    alpha=config.rmsprop_alpha)
    hardened_at = [0 if layer.is_hard else None for layer in layers]
    batches = minibatches(num_points, config.batch_size, generator)
    loss_d, penalty, start = None, None, 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        hardened_at, start = list(resume["hardened_at"]), resume["iteration"]
        for _ in range(start):  # the minibatch order is a pure function of the generator's seed
            next(batches)
    bar = tqdm(range(start, config.iters), desc=desc, leave=False, disable=not progress, initial=start,
               total=config.iters)
    for it in bar:
        loss_d = loss_fn(next(batches))
        penalty = ratio_penalty(layers, config.ratio_reg)
        loss = loss_d if penalty is None else loss_d + config.lambda_r * penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (it + 1) % SELECT_EVERY == 0:
            now = progressive_select(layers, config.select_threshold, config.hard_fraction)
            if now:
                drop_hardened(optimizer, layers)
                for j in now:
                    hardened_at[j] = it + 1
                logger.debug("iteration %d: hardened %d layer(s)", it + 1, len(now))
            loss_value = loss_d.item()
            bar.set_postfix(loss=f"{loss_value:.3g}", hard=sum(h is not None for h in hardened_at))
            if on_checkpoint is not None:
                on_checkpoint({"iteration": it + 1, "hardened_at": hardened_at, "loss": loss_value,
                               "penalty": None if penalty is None else penalty.item(),
                               "optimizer": optimizer.state_dict()})
    if resume is not None and loss_d is None:  # resumed from a checkpoint taken at the last iteration
        loss_d, penalty = resume["loss"], resume["penalty"]
    else:
        loss_d, penalty = (None if v is None else v.item() for v in (loss_d, penalty))
    selected = [layer.selected_fraction() for layer in layers]
    for layer in layers:
        layer.harden()
    return {"loss": loss_d, "penalty": penalty, "selected": selected, "hardened_at": hardened_at}


def seeded_generator(seed, *stream):
    """A CPU generator for the random stream (seed, *stream), e.g. (seed, 1, block): the minibatch order
    of a block depends only on these numbers, so a run resumed at a block boundary needs no saved RNG state."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    return torch.Generator().manual_seed(int(state))
