"""Small CNN that reads the embedded 16x16 digits: checks sample classes and serves as the FID feature network.

Input (N, 1, 16, 16) in [-1, 1] (the DiT's pixel space); `features` is the 128-dim penultimate layer.
"""
import json
import logging

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vq4dit.utils.fileio import atomic_path

logger = logging.getLogger(__name__)


class DigitsClassifier(nn.Module):
    def __init__(self, num_classes=10, width=32, feature_dim=128):
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (N, w, 8, 8)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 2w, 4, 4)
        )
        self.fc = nn.Linear(2 * w * 16, feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        # x (N, 1, 16, 16) -> (N, feature_dim)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))  # (N, num_classes) logits


def shift_augment(x, generator, max_shift=1):
    """Shift each image by up to `max_shift` pixels in x and y, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)  # (N, 1, H+2s, W+2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model, images, labels, batch_size=512):
    model.eval()
    preds = torch.cat([model(images[s:s + batch_size]).argmax(1) for s in range(0, len(images), batch_size)])
    return (preds == labels).float().mean().item()


def train_classifier(images, labels, epochs=30, batch_size=64, lr=2e-3, seed=0, num_classes=10):
    """Train a DigitsClassifier on (images (N, 1, 16, 16) in [-1, 1], labels (N,)) with 1-px shifts."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(images) // batch_size))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        total = 0.0
        for start in range(0, len(images), batch_size):
            idx = perm[start:start + batch_size]
            loss = F.cross_entropy(model(shift_augment(images[idx], gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        logger.info("epoch %d loss %.4f", epoch, total / len(images))
    return model.eval()


def save_classifier(model, path, metadata=None):
    meta = {"format": "vq4dit-digits-classifier", "config": json.dumps(model.config), **(metadata or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)


def load_classifier(path):
    """A DigitsClassifier saved by `save_classifier`, in eval mode."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = DigitsClassifier(**json.loads(meta["config"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
