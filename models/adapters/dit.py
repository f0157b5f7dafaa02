"""Class-conditional DiTs: the project's own DiT (models/dit.py) and, through a thin wrapper, diffusers'
DiTTransformer2DModel. Both run DiT's learned-variance DDPM sampler with classifier-free guidance as teacher."""
from models.adapters.base import Adapter, drop_rows
from models.diffusion import make_diffusion
from models.sampler import PerSampleNoise, class_labels, ddpm_sample, guided_channels_for, sample_seed

# the calibration noise stream: seeds derived from (seed, CALIB_STREAM) never coincide with the per-sample seeds
# (seed, index) that evaluation sampling uses for small sample indices
CALIB_STREAM = 2**40 + 7


def dit_teacher_runs(model, plan, device):
    """Teacher batches for a DiT-like `model` (called as model(x, t, y); attributes in_channels, input_size,
    num_classes): Gaussian latents and uniform labels from the (seed, CALIB_STREAM) stream, `plan.steps` DDPM
    steps with CFG. A trajectory's noise depends only on the seed and its index, not on the batch size."""
    stream_seed = sample_seed(plan.seed, CALIB_STREAM)
    labels = class_labels(stream_seed, plan.num_samples, model.num_classes)
    diffusion = make_diffusion(plan.steps)
    shape = (model.in_channels, model.input_size, model.input_size)
    for start in range(0, plan.num_samples, plan.batch_size):
        idx = range(start, min(start + plan.batch_size, plan.num_samples))

        def run(idx=idx):
            noise = PerSampleNoise(stream_seed, idx, shape, device)
            ddpm_sample(model, noise, labels[idx.start:idx.stop].to(device), diffusion, plan.cfg_scale,
                        null_class=model.num_classes, guided_channels=guided_channels_for(model.in_channels))

        yield len(idx), run


class DiTAdapter(Adapter):
    """The project's DiT: blocks.{i}, five Linears each (qkv, proj, fc1, fc2, adaLN_modulation.1)."""

    family = "dit"
    block_lists = ("blocks",)

    def teacher_runs(self, model, plan, device):
        return dit_teacher_runs(model, plan, device)

    def drop_labels(self, model, args, kwargs, p, generator):
        x, t, y = args  # DiT.forward(x, t, y)
        return (x, t, drop_rows(y, model.num_classes, p, generator)), kwargs

    def prediction(self, model, output):
        return output[:, :model.in_channels]  # the noise; the other channels are the variance interpolation

    def describe(self, model):
        return (f"DiT depth {len(model.blocks)}, hidden {model.pos_embed.shape[-1]}, {model.num_classes} classes, "
                f"{model.in_channels}x{model.input_size}x{model.input_size} inputs")
