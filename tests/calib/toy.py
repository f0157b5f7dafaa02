"""A toy two-stream transformer shaped like SD3 / Flux blocks, to test the model-agnostic calibration core.

Each block takes (hidden_states, encoder_hidden_states, temb, rope) by keyword and returns the two streams in the
other order, (encoder_hidden_states, hidden_states); `rope` is a table without a batch dimension shared by all
blocks, `temb` a per-row conditioning vector; between blocks the model calls nothing else.
"""
import torch
from torch import nn

from vq4dit.models.adapters.base import Adapter


class TwoStreamBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.to_h = nn.Linear(dim, dim)
        self.to_e = nn.Linear(dim, dim)
        self.mod = nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states, temb, rope=None):
        n = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, S + T, D)
        joint = torch.tanh(self.mix(joint) * (1 + rope[None]) + self.mod(temb)[:, None])
        return encoder_hidden_states + self.to_e(joint[:, :n]), hidden_states + self.to_h(joint[:, n:])


class ToyTransformer(nn.Module):
    """forward(x (B, T, C), context (B, S, D), t (B,)) -> (B, T, C)."""

    def __init__(self, dim=8, channels=4, tokens=6, context=3, depth=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj_in = nn.Linear(channels, dim)
        self.t_embed = nn.Linear(1, dim)
        self.transformer_blocks = nn.ModuleList([TwoStreamBlock(dim) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, channels)
        self.register_buffer("rope", torch.randn(context + tokens, dim) * 0.1)
        self.tokens, self.channels, self.context, self.dim = tokens, channels, context, dim

    def forward(self, x, context, t):
        h, e = self.proj_in(x), context
        temb = self.t_embed(t[:, None].float() / 1000)
        for block in self.transformer_blocks:
            e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb, rope=self.rope)
        return self.proj_out(h)


class ToyAdapter(Adapter):
    """Teacher: a few Euler-like steps from seeded noise, contexts drawn per trajectory, no guidance."""

    family = "toy"
    block_lists = ("transformer_blocks",)

    def rows_per_trajectory(self, plan):
        return 1

    def teacher_runs(self, model, plan, device):
        gen = torch.Generator().manual_seed(plan.seed)
        for start in range(0, plan.num_samples, plan.batch_size):
            n = min(plan.batch_size, plan.num_samples - start)
            x = torch.randn(n, model.tokens, model.channels, generator=gen)
            ctx = torch.randn(n, model.context, model.dim, generator=gen)

            def run(x=x, ctx=ctx):
                h = x
                for step in range(plan.steps):
                    t = torch.full((h.shape[0],), 1000 - step * (1000 // plan.steps))
                    h = h - 0.1 * model(h, ctx, t)

            yield n, run
