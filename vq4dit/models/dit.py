"""DiT (Peebles & Xie) written from the architecture description in docs/method.md "DiT".

Parameter names match the official checkpoints exactly, so `DiT-XL-2-256x256.pt` loads with
`strict=True`. Shapes in comments: N batch, T tokens, D hidden, C channels.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    # x (N, T, D); shift, scale (N, D) broadcast over tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_features(t, dim=256, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps: cos half, then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (N, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        # the sinusoid of t up to 999 needs float32 (bf16 would round t * freq by several radians);
        # only the finished features are cast to the network's dtype
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def building_on_meta():
    """Whether modules built now land on the meta device (`with torch.device("meta")`: a build for loading). Such a
    build skips the weight init: there are no values to set, and torch imports its compiler (2 s on a slow CPU) for
    the first normal_ of a meta tensor."""
    return torch.get_default_device().type == "meta"


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        table = torch.empty(num_classes + 1, hidden_size) if building_on_meta() else None  # None: nn.Embedding's init
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size, _weight=table)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block. forward(x (N, T, D), c (N, D)) -> (N, T, D)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos table (T, dim), tokens row-major; first half encodes the column (w), second the row (h).

    This is the layout of the official checkpoints and of diffusers (which does not store the table).
    """
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    return np.concatenate([sincos_pos_embed_1d(dim // 2, grid_w), sincos_pos_embed_1d(dim // 2, grid_h)], axis=1)


class DiT(nn.Module):
    """forward(x (N, C, H, W), t (N,), y (N,)) -> (N, 2C or C, H, W)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, mlp_ratio
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        table = torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # (1, T, D), fixed
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if not building_on_meta():
            self.initialize_weights()

    @property
    def config(self):
        """The constructor arguments; `DiT.from_config(model.config)` rebuilds the architecture, as in diffusers."""
        return {"input_size": self.input_size, "patch_size": self.patch_size, "in_channels": self.in_channels,
                "hidden_size": self.hidden_size, "depth": self.depth, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "num_classes": self.num_classes, "learn_sigma": self.learn_sigma}

    @classmethod
    def from_config(cls, config):
        """A DiT from `config`: constructor arguments, or the registry form {name, input_size, num_classes,
        in_channels, learn_sigma} that format-1 artifacts store."""
        config = dict(config)
        if "name" in config:
            name = config.pop("name")
            if name not in DiT_configs:
                raise ValueError(f"unknown model {name!r}; valid: {', '.join(DiT_configs)}")
            depth, hidden, heads, patch = DiT_configs[name]
            config.update(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
        return cls(**config)

    def initialize_weights(self):
        """Training-from-scratch init: xavier Linears, zero adaLN and zero final projection."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, x, t, y):
        """Tokens (N, T, D) and conditioning c (N, D): everything before the blocks."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, c

    def unpatchify(self, x):
        # (N, T, p*p*C) -> (N, C, H, W)
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def head(self, tokens, c):
        return self.unpatchify(self.final_layer(tokens, c))

    def forward(self, x, t, y):
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.head(tokens, c)


# name -> (depth, hidden, heads, patch); the official names plus the embedded digits model
ARCHS = {
    "DiT-XL": (28, 1152, 16), "DiT-L": (24, 1024, 16), "DiT-B": (12, 768, 12), "DiT-S": (12, 384, 6),
}
DiT_configs = {f"{arch}/{p}": (*ARCHS[arch], p) for arch in ARCHS for p in (2, 4, 8)}
DiT_configs["DiT-Digits/2"] = (6, 128, 4, 2)


def _builder(depth, hidden, heads, patch):
    def build(**kwargs):
        return DiT(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)
    return build


DiT_models = {name: _builder(*config) for name, config in DiT_configs.items()}
