"""Training loop for the embedded digits DiT (hybrid loss, label dropout, EMA), resumable.

Every random draw comes from one seeded generator whose state is checkpointed with the model,
EMA and optimizer, and the learning rate depends only on the step, so a run stopped and resumed
at a checkpoint equals an uninterrupted run with the same --steps.
"""
import copy
import logging
import os
import time

import torch
from tqdm import tqdm

from vq4dit.models.diffusion import make_diffusion, q_sample, training_loss
from vq4dit.utils.fileio import atomic_path

logger = logging.getLogger(__name__)


@torch.no_grad()
def update_ema(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)


def learning_rate(step, lr, warmup):
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


def train_dit(model, images, labels, steps, batch_size=64, lr=3e-4, warmup=0, ema_decay=0.999, label_drop=0.1,
              seed=0, checkpoint=None, checkpoint_every=500, progress=True):
    """Train `model` on (images (N, C, H, W), labels (N,)); returns (model, EMA copy), both in eval mode.

    `checkpoint`: a path where the full training state is saved every `checkpoint_every` steps and
    from which training resumes when it exists.
    """
    gen = torch.Generator().manual_seed(seed)
    diff = make_diffusion()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    start = 0
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        start = int(state["step"])
        if start > steps:
            raise ValueError(f"{checkpoint} is at step {start}, past the requested {steps} steps")
        logger.info("resumed training at step %d from %s", start, checkpoint)
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc="train", disable=not progress, initial=start, total=steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, lr, warmup)
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        # classifier-free guidance: drop labels to the null class id
        drop = torch.rand(batch_size, generator=gen) < label_drop
        y = torch.where(drop, torch.full_like(y, model.num_classes), y)
        i = torch.randint(diff.num_steps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = q_sample(diff, x0, i, noise)
        loss = training_loss(diff, model(xt, i, y), x0, xt, i, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, ema_decay if step > 100 else 0.0)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            logger.info("step %d loss %.4f (%.0f s)", step, loss.item(), time.time() - t0)
        if checkpoint and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "rng": gen.get_state(), "step": step + 1}
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    return model.eval(), ema.eval()
