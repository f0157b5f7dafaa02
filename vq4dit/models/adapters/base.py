"""What the quantize and sample jobs need to know about one family of diffusion transformers.

Calibration itself knows no model: it records the block calls of whatever the adapter's teacher runs
(calib/record.py) and replays them. An adapter says which modules are the transformer blocks, which Linears
inside them are quantized, how the full-precision teacher samples (zero data), and how to draw images.
"""
import re
from dataclasses import dataclass

import torch
from torch import nn

from vq4dit.utils.errors import UserError

# the calibration noise stream: seeds derived from (seed, CALIB_STREAM) never coincide with the per-sample seeds
# (seed, index) that sampling uses for small sample indices
CALIB_STREAM = 2**40 + 7


@dataclass(frozen=True)
class SampleSettings:
    """How sample.py draws images: the same for every model family (unused fields are ignored by a family)."""

    seed: int = 0
    steps: int = 50
    cfg_scale: float = 1.5
    batch_size: int = 64
    vae: str = "ema"  # latent DiTs of the project: ema | mse | a local AutoencoderKL directory
    pipeline: str | None = None  # diffusers artifacts: the pipeline to sample through (None: the recorded source)
    num_frames: int | None = None  # video pipelines: frames per sample (None: as calibrated, else the pipeline's)
    height: int | None = None  # text-to-image and video pipelines: pixels (None: as calibrated, else the pipeline's)
    width: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class ImageSampler:
    """draw(indices (list of int), conditions (those samples' entries)) -> uint8 images (N, H, W, 3); `size`:
    (H, W), so that a process with no samples to draw still knows the shape of what the others send."""

    draw: object
    size: tuple

    def __call__(self, indices, conditions):
        return self.draw(indices, conditions)


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

    def stream_blocks(self, model):
        """[(qualified name, module)] a streamed run keeps on the host (models/offload.py): found without running
        the model, since a streamed model runs only once they stream; `blocks` or more."""
        return self.blocks(model)

    def quant_include(self, model):
        """Regex over qualified names: the nn.Linear layers inside the blocks that get quantized."""
        prefixes = "|".join(re.escape(attr) for attr in self.block_lists)
        exclude = f"(?!.*(?:{self.exclude}))" if self.exclude else ""
        return rf"^(?:{prefixes})\.\d+\.{exclude}"

    def linears(self, model):
        """The qualified names of the Linears that quant_include selects (for reports and tests)."""
        pattern = re.compile(self.quant_include(model))
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]

    def bind(self, extra, prompts=None, height=None, width=None, num_frames=None):
        """Hand the adapter what its teacher needs beyond the model, before teacher_runs: the model reference's extra
        keys (e.g. the diffusers pipeline source), the teacher's prompts, image size and frames (diffusers
        pipelines). Returns the extra keys to record in the artifact's model reference."""
        given = [k for k, v in (("prompts", prompts), ("height", height), ("width", width), ("num_frames", num_frames))
                 if v]
        if given:
            raise UserError(f"{', '.join(given)}: not used with a {self.family} model, class-conditional at a fixed "
                            "size (for text-to-image and video pipelines: PixArt, SD3, Flux, Wan, ...)")
        return dict(extra)

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

    def num_classes(self, model):
        """Class ids a class-conditional model takes (0..num_classes-1), or None for a text-conditioned one."""
        return None

    def conditions(self, model, num_samples, seed, classes=None, prompts=None):
        """What each of `num_samples` samples is conditioned on: (a list with one entry per sample, to hand to
        the image sampler; an int64 array (N,) stored as arr_1 of samples.npz: class ids, or prompt indices)."""
        raise NotImplementedError

    def image_sampler(self, model, extra, settings, device):
        """An ImageSampler for `model` (on `device`): draw(indices, conditions) for sample indices (ints) and their
        conditions (a slice of what `conditions` returned). `extra`: the model reference's extra keys (e.g. the
        diffusers pipeline source). An image must depend only on the seed, its index and its condition, as far as
        the family allows."""
        raise NotImplementedError

    def prediction(self, model, output):
        """The part of a model output that prediction-error metrics compare (e.g. the noise channels)."""
        return output

    def describe(self, model):
        """One line naming the model, for logs."""
        return f"{self.family} {type(model).__name__}"


def linear_pattern(default, include=None, exclude=None):
    """One regex over qualified Linear names: those `include` matches (None: `default`, the adapter's rule) and
    `exclude` does not (re.search semantics for both)."""
    if not include and not exclude:
        return default
    keep = f"(?=.*?(?:{include or default}))"
    return f"^{keep}(?!.*?(?:{exclude}))" if exclude else f"^{keep}"


def selected_pattern(adapter, model, include=None, exclude=None):
    """linear_pattern of Adapter `adapter`'s rule for `model` and the user's --include / --exclude; a UserError
    naming the flags, with a few of the model's Linear names, when it selects no nn.Linear of `model`."""
    pattern = linear_pattern(adapter.quant_include(model), include, exclude)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not any(re.search(pattern, n) for n in names):
        given = " and ".join(f"--{flag} {value!r}" for flag, value in (("include", include), ("exclude", exclude))
                             if value)
        raise UserError(f"no nn.Linear of the model matches {given or 'the model rule'}; its {len(names)} Linears "
                        f"are named like {', '.join(names[:3])}")
    return pattern


def outside_blocks(adapter, model, pattern):
    """Qualified names of the Linears `pattern` selects that lie outside the transformer blocks (calibration
    replays block calls only, so these keep their k-means codebooks uncalibrated)."""
    inside = tuple(f"{name}." for name, _ in adapter.blocks(model))
    selected = re.compile(pattern)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and selected.search(n)
            and not n.startswith(inside)]


def drop_rows(labels, null_class, p, generator):
    """labels (N,) with each entry replaced by `null_class` with probability p (draws from `generator`, on CPU)."""
    drop = torch.rand(labels.shape[0], generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)
