"""diffusers' DiTTransformer2DModel (DiTPipeline, e.g. facebook/DiT-XL-2-256) in its own form and layer names.

Blocks are transformer_blocks.{i} (BasicTransformerBlock, ada_norm_zero); every block holds a copy of the timestep
and class embedders under norm1.emb, which stay in full precision like every embedder. Quantized per block:
attn1.to_q / to_k / to_v (three codebooks, as the paper counts them), attn1.to_out.0, ff.net.0.proj, ff.net.2
and norm1.linear (adaLN). The teacher is DiT's own learned-variance DDPM sampler, driving the transformer through
`AsDiT`, so a diffusers DiT is calibrated on exactly the trajectories the project's DiT would be.
"""
import torch
from torch import nn

from vq4dit.models.adapters.base import Adapter, ImageSampler, drop_rows
from vq4dit.models.adapters.dit import class_conditions, dit_teacher_runs
from vq4dit.models.pipelines import load_pipeline, to_uint8_images
from vq4dit.models.sampler import sample_seed
from vq4dit.utils.errors import UserError

IMAGENET_CLASSES = 1000  # DiTPipeline's null class id


class AsDiT(nn.Module):
    """Call a DiTTransformer2DModel as model(x (N, C, H, W), t (N,), y (N,)) -> (N, 2C, H, W), like models.dit.DiT."""

    def __init__(self, transformer):
        super().__init__()
        config = transformer.config
        self.transformer = transformer
        self.in_channels = config.in_channels
        self.input_size = config.sample_size
        self.num_classes = config.num_embeds_ada_norm  # the null class id is num_classes (diffusers' LabelEmbedding)
        self.learn_sigma = (config.out_channels or config.in_channels) == 2 * config.in_channels
        if not self.learn_sigma:
            raise UserError("the DiT transformer predicts the noise only (out_channels == in_channels); DiT's "
                            "learned-variance sampler needs the noise and variance outputs of every released DiT")

    def forward(self, x, t, y):
        return self.transformer(x, timestep=t, class_labels=y).sample


class DiffusersDiTAdapter(Adapter):
    family = "diffusers-dit"
    block_lists = ("transformer_blocks",)
    exclude = r"norm1\.emb\."

    def teacher_runs(self, model, plan, device):
        return dit_teacher_runs(AsDiT(model), plan, device)

    def drop_labels(self, model, args, kwargs, p, generator):
        labels = drop_rows(kwargs["class_labels"], model.config.num_embeds_ada_norm, p, generator)
        return args, {**kwargs, "class_labels": labels}

    def num_classes(self, model):
        return model.config.num_embeds_ada_norm

    def conditions(self, model, num_samples, seed, classes=None, prompts=None):
        return class_conditions(model.config.num_embeds_ada_norm, num_samples, seed, classes, prompts)

    def image_sampler(self, model, extra, settings, device):
        """Through the DiTPipeline the model came from (its VAE and scheduler), with this transformer."""
        source = settings.pipeline or (extra.get("pipeline") or {}).get("source")
        if source is None:
            raise UserError("this artifact records no diffusers pipeline to sample through; pass --pipeline DIR")
        if settings.cfg_scale > 1 and model.config.num_embeds_ada_norm != IMAGENET_CLASSES:
            raise UserError(f"diffusers' DiTPipeline uses class {IMAGENET_CLASSES} as the null class of guidance; "
                            f"this model has {model.config.num_embeds_ada_norm} classes: sample with --cfg-scale 1")
        pipe = load_pipeline(source, device, transformer=model)
        size = model.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # the VAE's upsampling

        def draw(indices, labels):
            generators = [torch.Generator().manual_seed(sample_seed(settings.seed, i)) for i in indices]
            torch.manual_seed(sample_seed(settings.seed, indices[0]))  # the scheduler's noise uses the global RNG
            out = pipe(class_labels=labels.tolist(), guidance_scale=settings.cfg_scale, generator=generators,
                       num_inference_steps=settings.steps, output_type="np")
            return to_uint8_images(out.images)

        return ImageSampler(draw, (size, size))

    def prediction(self, model, output):
        return output.sample[:, :model.config.in_channels]

    def describe(self, model):
        c = model.config
        return (f"diffusers DiTTransformer2DModel: {c.num_layers} layers, {c.num_attention_heads} x "
                f"{c.attention_head_dim} heads, {c.num_embeds_ada_norm} classes, sample {c.sample_size}")
