"""Training loop for the embedded digits DiT (hybrid loss, label dropout, EMA)."""
import copy
import logging
import time

import torch
from tqdm import tqdm

from models.diffusion import make_diffusion, q_sample, training_loss

logger = logging.getLogger(__name__)


@torch.no_grad()
def update_ema(ema, model, decay):
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)


def train_dit(model, images, labels, steps, batch_size=64, lr=3e-4, ema_decay=0.999, seed=0, progress=True):
    """Train `model` on (images (N, C, H, W), labels (N,)); returns the EMA copy in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    diff = make_diffusion()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc="train", disable=not progress)
    for step in bar:
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        i = torch.randint(diff.num_steps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = q_sample(diff, x0, i, noise)
        out = model(xt, i, y, train=True)
        loss = training_loss(diff, out, x0, xt, i, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, ema_decay if step > 100 else 0.0)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            logger.info("step %d loss %.4f (%.0f s)", step, loss.item(), time.time() - start)
    return ema.eval()
