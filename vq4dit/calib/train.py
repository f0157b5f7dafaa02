"""The optimisation shared by every calibration mode: RMSprop on ratio logits, codebooks and biases, the ratio
regulariser, and progressive selection (docs/method.md "Calibration" and "The authors' calibration").

`Trainer` makes one update at a time from a distillation loss L_d that the caller computed on whatever data it
chose: a minibatch of cached calibration points, or the teacher's current sampler step (the online recipe).
`train(layers, loss_fn, ...)` is the minibatch loop on top of it and knows nothing about blocks: `loss_fn(idx)`
returns L_d of the minibatch `idx` (indices into the calibration points) with gradients to the layers.
"""
import contextlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from vq4dit.calib.micro import minibatch_loss
from vq4dit.utils import distributed

logger = logging.getLogger(__name__)

# train() shows the loss and offers a snapshot every CHECKPOINT_EVERY updates: reading the loss synchronises a GPU
CHECKPOINT_EVERY = 10
# config.plateau > 0: the mean minibatch loss of each window of this many updates is compared with the window before
PLATEAU_WINDOW = 50

RATIO_PENALTIES = {
    # both are 0 at one-hot ratios and largest at uniform ones; r: (A, n) ratios of the free sub-vectors
    "code": lambda r: r.shape[1] * (r * (1 - r)).mean(),  # the authors' code: n * mean(r (1 - r))
    "paper": lambda r: (1 - (2 * r - 1).abs()).mean(),  # the paper's text: mean(1 - |2r - 1|)
}


def ratio_penalty(layers, form="code", active=None):
    """L_r over the not-yet-frozen sub-vectors of each soft layer (`form`: a key of RATIO_PENALTIES), averaged
    over the soft layers (so lambda_r does not scale with how many layers share one loss).

    active: per layer, the (A,) positions of its free sub-vectors, None for a layer without any (active_rows);
    default: read from the layers' `frozen` flags, which makes the host wait for the device.
    Returns a scalar tensor, or None when no layer has a free sub-vector left.
    """
    active = active_rows(layers) if active is None else active
    terms = [RATIO_PENALTIES[form](torch.softmax(layer.logits.index_select(0, rows), dim=1))  # (A, n) -> ()
             for layer, rows in zip(layers, active) if rows is not None]
    return torch.stack(terms).mean() if terms else None


def active_rows(layers):
    """Per layer of `layers`, the (A,) positions of its free (not frozen) sub-vectors in increasing order, None
    for a hard layer or one whose sub-vectors are all frozen. Reads each soft layer's frozen count: call it when
    the flags change (progressive_select), not at every update."""
    soft = [layer for layer in layers if not layer.is_hard]
    counts = iter(torch.stack([(~layer.frozen).sum() for layer in soft]).tolist() if soft else [])
    out = []
    for layer in layers:
        free = 0 if layer.is_hard else next(counts)
        # the free rows sort first (0 < 1), in increasing order: nonzero_static's result, which CUDA lacks before
        # torch 2.6, with no read of the count (nonzero would read it)
        out.append(torch.argsort(layer.frozen.to(torch.int8), stable=True)[:free] if free else None)
    return out


def codebook_lr(config, update):
    """The codebook-and-bias learning rate of update number `update` (0-based) of a run of config.iters updates:
    config.lr_codebook throughout ("constant"), or half a cosine from it to 0 ("cosine"). A pure function of the
    update count, so a resumed run continues the schedule where it stopped."""
    if config.lr_schedule == "constant":
        return config.lr_codebook
    return config.lr_codebook * 0.5 * (1 + math.cos(math.pi * min(update, config.iters) / config.iters))


def codebook_trains(layer, train_codebooks):
    """Whether `layer`'s codebook trains now: always, or ("when_hard") only once the layer is hard."""
    return train_codebooks == "always" or layer.is_hard


def param_groups(layers, lr_ratio, lr_codebook, train_codebooks="always"):
    """Group 0: ratio logits of the soft layers; group 1: the codebooks that train now, then every bias.

    Both in layer order, so a group's parameter list is a function of which layers are hard: an optimizer
    state saved mid-run loads back onto the groups rebuilt from the restored layers.
    """
    logits = [layer.logits for layer in layers if not layer.is_hard]
    rest = [layer.codebook for layer in layers if codebook_trains(layer, train_codebooks)]
    rest += [layer.bias for layer in layers if layer.bias is not None]
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

    Returns the positions (in `layers`) of the layers hardened now. The frozen fractions are read together, once.
    """
    soft = [j for j, layer in enumerate(layers) if not layer.is_hard]
    for j in soft:
        layers[j].freeze_confident_(threshold)
    fractions = torch.stack([layers[j].frozen_fraction() for j in soft]).tolist() if soft else []
    hardened = [j for j, fraction in zip(soft, fractions) if fraction > hard_fraction]
    for j in hardened:
        layers[j].harden()
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


@dataclass(frozen=True)
class Minibatches:
    """The minibatch order of a training run: `num_points` calibration points in batches of `batch_size`, drawn
    from `generator` (a fresh one of the same seed replays the same order)."""

    num_points: int
    batch_size: int
    generator: torch.Generator

    def __iter__(self):
        return minibatches(self.num_points, self.batch_size, self.generator)


def _value(v):
    return v.item() if torch.is_tensor(v) else v


class Trainer:
    """RMSprop on the ratio logits, codebooks and biases of `layers` (list of VQLinear), one update per `step`.

    config: calib.config.CalibConfig; fields used: lr_ratio, lr_codebook, rmsprop_alpha, lambda_r, ratio_reg,
    select_threshold, hard_fraction, select_every, train_codebooks, ratio_gate.
    - train_codebooks "always": every codebook trains from the start; "when_hard" (the authors' code): a soft
      layer's codebook gets no gradient (requires_grad off) and no update, and joins the optimizer, with a fresh
      RMSprop state, when its layer hardens. Biases train from the start either way.
    - ratio_gate "none": lambda_r * L_r is added at every update; "running_min" (the authors' code): it is added
      only when L_r is strictly above the smallest L_r of the earlier updates of the current trajectory, and every
      value, added or not, updates that minimum. The first update of a trajectory therefore never adds it, nor
      does any update that sets a new minimum. `new_trajectory()` forgets the minimum.
    - progressive selection (`progressive_select`) runs after every `select_every`-th update.
    - plateau > 0: after every PLATEAU_WINDOW updates, `stalled` says whether the window's mean L_d fell by less
      than that fraction of the previous window's (minibatch losses vary several-fold: a window mean is stable).

    resume: a `snapshot()` taken earlier, with the layers restored to their state at that moment; the trainer
    then continues exactly as the one that took it would have.
    sync: a utils.distributed.GradSync when several processes train the same layers, each on its share of each
    minibatch's rows (quantize.py under torchrun, calib.shared.SharedLoss): `step` then takes this rank's share of
    L_d (its rows' squared errors over the global minibatch's element count; a 0-d zero without gradient when it
    computes none of the rows), the
    gradients and L_d are summed over the ranks, and L_r joins rank 0's loss only. Every rank then holds the same
    parameters, L_r, loss and hardening decisions: none takes another branch.
    """

    def __init__(self, layers, config, resume=None, sync=None):
        self.layers, self.config, self.sync = list(layers), config, sync
        self.gated = config.ratio_gate == "running_min"
        self._sync_codebooks()
        self.active = active_rows(self.layers)  # the free rows L_r covers, refreshed when selection freezes rows
        self.optimizer = torch.optim.RMSprop(self._groups(), alpha=config.rmsprop_alpha)
        self.updates = 0  # updates made so far, the count snapshots and `hardened_at` use
        self.hardened_at = [0 if layer.is_hard else None for layer in self.layers]
        self._ratio_min = None  # smallest L_r of the current trajectory, a 0-d tensor (None: none seen yet)
        self.loss = self.penalty = None  # last L_d and L_r (tensors, or floats restored from a snapshot)
        self.window = [None, 0.0]  # plateau: [previous window's mean L_d, sum of L_d in the current window]
        self.stalled = False
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.updates, self.hardened_at = resume["iteration"], list(resume["hardened_at"])
            self.loss, self.penalty = resume["loss"], resume["penalty"]
            if resume["ratio_min"] is not None:
                self._ratio_min = torch.tensor(resume["ratio_min"], device=self.layers[0].codebook.device)
            self.window = list(resume.get("window", self.window))

    def _groups(self):
        c = self.config
        return param_groups(self.layers, c.lr_ratio, c.lr_codebook, c.train_codebooks)

    def _sync_codebooks(self):
        if self.config.train_codebooks != "always":
            for layer in self.layers:
                layer.codebook.requires_grad_(codebook_trains(layer, self.config.train_codebooks))

    @property
    def all_hard(self):
        return all(layer.is_hard for layer in self.layers)

    @property
    def ratio_min(self):
        """The smallest L_r of the current trajectory (ratio_gate "running_min"), a float; None: none seen yet."""
        return _value(self._ratio_min)

    def new_trajectory(self):
        """Start a new trajectory: the running minimum of L_r (ratio_gate "running_min") is forgotten."""
        self._ratio_min = None

    def _regulariser(self, penalty):
        """lambda_r * L_r as it joins this update's loss (see the class docstring), None when it does not; updates
        the running minimum. The gate stays on the device: a closed gate multiplies the term by 0, which adds exact
        zeros to the gradients, so the host never waits to read L_r."""
        if penalty is None:
            return None
        term = self.config.lambda_r * penalty
        if not self.gated:
            return term
        value, least = penalty.detach(), self._ratio_min
        self._ratio_min = value if least is None else torch.minimum(least, value)
        return None if least is None else term * (value > least).to(term.dtype)

    def step(self, loss_d):
        """One update from L_d (a scalar tensor with gradients to the layers): loss_d + lambda_r * L_r (when the
        gate lets it), backward, RMSprop step, then progressive selection when its turn comes. loss_d may also be
        an iterable of scalar tensors that sum to L_d (calib.micro.micro_losses): each one's backward runs before
        the next is made, so the gradients accumulate while one micro-batch's activations are held at a time.

        Returns the positions (in `layers`) of the layers this update hardened.
        """
        c = self.config
        penalty = ratio_penalty(self.layers, c.ratio_reg, self.active)
        loss_d = self._backward(loss_d, self._regulariser(penalty))
        self.optimizer.param_groups[1]["lr"] = codebook_lr(c, self.updates)
        self.optimizer.step()
        self.updates += 1
        self.loss, self.penalty = loss_d.detach(), None if penalty is None else penalty.detach()
        if c.plateau > 0:
            self._watch_plateau(c.plateau)
        if self.updates % c.select_every:
            return []
        now = progressive_select(self.layers, c.select_threshold, c.hard_fraction)
        self.active = active_rows(self.layers)
        if now:
            for j in now:
                self.hardened_at[j] = self.updates
            drop_hardened(self.optimizer, self.layers)
            self._sync_codebooks()
            self.optimizer.param_groups[1]["params"] = self._groups()[1]["params"]
            logger.debug("update %d: hardened %d layer(s)", self.updates, len(now))
        return now

    def _backward(self, loss_d, regulariser):
        """The gradients of L_d (+ `regulariser`, on rank 0 only under `sync`), L_d a tensor or an iterable of its
        parts (see step); under `sync` the gradients and L_d are summed over the ranks (see the class docstring).
        Returns L_d, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.sync is not None and distributed.rank() != 0:
            regulariser = None
        total = None
        for part in [loss_d] if torch.is_tensor(loss_d) else loss_d:
            loss = part if regulariser is None else part + regulariser
            regulariser = None  # joins the first part's backward only
            if loss.requires_grad:  # a rank holding none of a part's rows has nothing to differentiate
                loss.backward()
            total = part.detach() if total is None else total + part.detach()
        if self.sync is None:
            return total
        return self.sync.reduce([p for group in self.optimizer.param_groups for p in group["params"]], total)

    def _watch_plateau(self, fraction):
        """Add this update's L_d to the window (a device tensor: read once per window, not per update)."""
        self.window[1] = self.window[1] + self.loss
        if self.updates % PLATEAU_WINDOW == 0:
            mean = _value(self.window[1]) / PLATEAU_WINDOW
            self.stalled = self.window[0] is not None and mean > (1 - fraction) * self.window[0]
            self.window = [mean, 0.0]

    def snapshot(self):
        """{"iteration": updates made, "hardened_at", "loss", "penalty", "ratio_min" (JSON-able), "optimizer":
        optimizer.state_dict() (its tensors are the live ones: serialise them before the next step)}."""
        return {"iteration": self.updates, "hardened_at": list(self.hardened_at), "loss": _value(self.loss),
                "penalty": _value(self.penalty), "ratio_min": self.ratio_min,
                "window": [self.window[0], _value(self.window[1])], "optimizer": self.optimizer.state_dict()}

    def finish(self):
        """Harden every layer at its argmax; returns {"loss": last L_d, "penalty": last L_r (or None), "selected":
        per-layer frozen fraction before this final hardening, "hardened_at": per-layer update count at which
        progressive selection hardened it (0: hard from the start, None: hardened here)}."""
        selected = [layer.selected_fraction() for layer in self.layers]
        for layer in self.layers:
            layer.harden()
        self._sync_codebooks()
        return {"loss": _value(self.loss), "penalty": _value(self.penalty), "selected": selected,
                "hardened_at": list(self.hardened_at), "updates": self.updates}


def train(layers, loss_fn, batches, config, desc=None, resume=None, on_checkpoint=None, sync=None):
    """Minimise L_d + lambda_r * L_r over `config.iters` minibatches of `batches` (Minibatches), or fewer when
    config.plateau > 0 and the loss stalls once every layer is hard (Trainer); every layer is hard afterwards.
    layers: list of VQLinear; loss_fn(idx) -> L_d of the minibatch idx (B,); desc: the progress bar's label (None:
    no bar). Returns `Trainer.finish()`'s dict ("updates": how many were made).

    Every CHECKPOINT_EVERY iterations `on_checkpoint(snapshot)` gets a `Trainer.snapshot()`; passing it back as
    `resume`, with the layers restored to their state at that moment and Minibatches with a fresh generator of the
    same seed, continues the run exactly. The whole run is one trajectory for ratio_gate "running_min".
    sync: see Trainer (several processes: loss_fn(idx) gives this rank's share of the minibatch idx's L_d).
    """
    trainer = Trainer(layers, config, resume, sync)
    order = iter(batches)
    for _ in range(trainer.updates):  # the minibatch order is a pure function of the generator's seed
        next(order)
    bar = tqdm(range(trainer.updates, config.iters), desc=desc, leave=False, disable=desc is None,
               initial=trainer.updates, total=config.iters)
    device = layers[0].codebook.device if layers else "cpu"
    for _ in bar:
        trainer.step(minibatch_loss(loss_fn, next(order), config, device))
        if trainer.stalled and trainer.all_hard:  # plateau: every layer hard and the loss no longer falling
            break
        if trainer.updates % CHECKPOINT_EVERY == 0:
            bar.set_postfix(loss=f"{trainer.loss.item():.3g}", hard=sum(h is not None for h in trainer.hardened_at))
            if on_checkpoint is not None:
                on_checkpoint(trainer.snapshot())
    return trainer.finish()


def seeded_generator(seed, *stream):
    """A CPU generator for the random stream (seed, *stream), e.g. (seed, 1, block): the minibatch order
    of a block depends only on these numbers, so a run resumed at a block boundary needs no saved RNG state."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    return torch.Generator().manual_seed(int(state))
