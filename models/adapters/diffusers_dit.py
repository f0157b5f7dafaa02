"""diffusers' DiTTransformer2DModel (DiTPipeline, e.g. facebook/DiT-XL-2-256) in its own form and layer names.

Blocks are transformer_blocks.{i} (BasicTransformerBlock, ada_norm_zero); every block holds a copy of the timestep
and class embedders under norm1.emb, which stay in full precision like every embedder. Quantized per block:
attn1.to_q / to_k / to_v (three codebooks, as the paper counts them), attn1.to_out.0, ff.net.0.proj, ff.net.2
and norm1.linear (adaLN). The teacher is DiT's own learned-variance DDPM sampler, driving the transformer through
`AsDiT`, so a diffusers DiT is calibrated on exactly the trajectories the project's DiT would be.
"""
from torch import nn

from models.adapters.base import Adapter, drop_rows
from models.adapters.dit import dit_teacher_runs
from utils.errors import UserError


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

    def prediction(self, model, output):
        return output.sample[:, :model.config.in_channels]

    def describe(self, model):
        c = model.config
        return (f"diffusers DiTTransformer2DModel: {c.num_layers} layers, {c.num_attention_heads} x "
                f"{c.attention_head_dim} heads, {c.num_embeds_ada_norm} classes, sample {c.sample_size}")
