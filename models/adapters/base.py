"""What the quantize and sample jobs need to know about one family of diffusion transformers.

Calibration itself knows no model: it records the block calls of whatever the adapter's teacher runs
(calib/record.py) and replays them. An adapter says which modules are the transformer blocks, which Linears
inside them are quantized, how the full-precision teacher samples (zero data), and how to draw images.
"""
import re
from dataclasses import dataclass

import torch
from torch import nn

from utils.errors import UserError


@dataclass(frozen=True)
class TeacherPlan:
    """Zero-data teacher trajectories: `num_samples` sampler runs of `steps` steps with guidance `cfg_scale`,
    `batch_size` trajectories at a time, noise and conditions drawn from `seed`."""

    num_samples: int
    steps: int
    cfg_scale: float
    seed: int
    batch_size: int = 64


class Adapter:
    """Base class; subclasses fill in the model specifics."""

    family = "abstract"  # a short name for logs and errors
    block_lists = ()  # attribute names of the nn.ModuleLists of transformer blocks, in execution order
    exclude = None  # regex of Linears inside the blocks that stay in full precision (e.g. embedder copies)

    def blocks(self, model):
        """[(qualified name, module)] of every transformer block, in the order the model calls them."""
        out = []
        for attr in self.block_lists:
            out += [(f"{attr}.{i}", block) for i, block in enumerate(getattr(model, attr))]
        return out

    def quant_include(self, model):
        """Regex over qualified names: the nn.Linear layers inside the blocks that get quantized."""
        prefixes = "|".join(re.escape(attr) for attr in self.block_lists)
        exclude = f"(?!.*(?:{self.exclude}))" if self.exclude else ""
        return rf"^(?:{prefixes})\.\d+\.{exclude}"

    def linears(self, model):
        """The qualified names of the Linears that quant_include selects (for reports and tests)."""
        pattern = re.compile(self.quant_include(model))
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]

    def rows_per_trajectory(self, plan):
        """Model-call batch rows per trajectory: 2 when classifier-free guidance doubles the batch."""
        return 2 if plan.cfg_scale != 1.0 else 1

    def teacher_runs(self, model, plan, device):
        """Yield (trajectories, run) pairs; run() samples that many trajectories with `model`, one model call per
        sampler step, so hooks on the model see every step."""
        raise NotImplementedError

    def drop_labels(self, model, args, kwargs, p, generator):
        """The model inputs with each row's class label replaced by the null class with probability p (the authors'
        student sees this: it stays in training mode); only class-conditional models have labels to drop."""
        raise UserError(f"{self.family} models have no class labels to drop (student_label_dropout)")

    def prediction(self, model, output):
        """The part of a model output that prediction-error metrics compare (e.g. the noise channels)."""
        return output

    def describe(self, model):
        """One line naming the model, for logs."""
        return f"{self.family} {type(model).__name__}"


def drop_rows(labels, null_class, p, generator):
    """labels (N,) with each entry replaced by `null_class` with probability p (draws from `generator`, on CPU)."""
    drop = torch.rand(labels.shape[0], generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)
