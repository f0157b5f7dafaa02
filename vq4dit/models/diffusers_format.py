"""Key mapping between the official DiT state dict and diffusers' DiT format (docs/method.md "The diffusers format").

diffusers (`DiTTransformer2DModel`, legacy `Transformer2DModel`) stores a copy of the timestep and
class embedders in every block, splits qkv into to_q/to_k/to_v and names the final layer
proj_out_1 (adaLN) / proj_out_2 (linear). pos_embed is not stored: it is the same fixed sin-cos table.
"""
import torch

from vq4dit.utils.errors import UserError

# (official suffix, diffusers suffix) inside one block
_BLOCK_KEYS = [
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
    ("adaLN_modulation.1", "norm1.linear"),
]
# (official name, diffusers name inside transformer_blocks.{i}.norm1.emb.)
_EMBEDDER_KEYS = [
    ("t_embedder.mlp.0", "timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
]
_TOP_KEYS = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
]
_PARAMS = ("weight", "bias")


def is_diffusers_state_dict(state):
    return any(k.startswith("transformer_blocks.") for k in state)


def _take(state, key, source):
    if key not in state:
        raise UserError(f"{source}: diffusers weights lack {key!r}; not a complete DiT transformer")
    return state[key]


def from_diffusers_state_dict(state, source="weights"):
    """diffusers DiT keys -> official keys (without pos_embed). Per-block embedder copies must be identical."""
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    out = {}
    for ours, theirs in _TOP_KEYS:
        for p in _PARAMS:
            out[f"{ours}.{p}"] = _take(state, f"{theirs}.{p}", source)
    embedders = [(f"{o}.{p}", f"{t}.{p}") for o, t in _EMBEDDER_KEYS for p in _PARAMS]
    embedders.append(("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight"))
    for ours, theirs in embedders:
        copies = [_take(state, f"transformer_blocks.{i}.norm1.emb.{theirs}", source) for i in range(depth)]
        for i, copy in enumerate(copies[1:], start=1):
            if copy.shape != copies[0].shape or not torch.equal(copy, copies[0]):
                raise UserError(f"{source}: block {i} holds a different copy of {theirs} than block 0; "
                                "DiT shares one embedder across blocks, so these weights are not a DiT")
        out[ours] = copies[0]
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for p in _PARAMS:
            qkv = [_take(state, f"{src}attn1.to_{n}.{p}", source) for n in "qkv"]
            out[f"{dst}attn.qkv.{p}"] = torch.cat(qkv, dim=0)  # (3D, D) / (3D,): q, k, v row blocks
            for ours, theirs in _BLOCK_KEYS:
                out[f"{dst}{ours}.{p}"] = _take(state, f"{src}{theirs}.{p}", source)
    return out


def to_diffusers_state_dict(state):
    """Official DiT keys -> diffusers DiT keys (embedders copied into every block, pos_embed dropped)."""
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = {}
    for ours, theirs in _TOP_KEYS:
        for p in _PARAMS:
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"].clone()
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in _EMBEDDER_KEYS:
            for p in _PARAMS:
                out[f"{dst}norm1.emb.{theirs}.{p}"] = state[f"{ours}.{p}"].clone()
        table = state["y_embedder.embedding_table.weight"]
        out[f"{dst}norm1.emb.class_embedder.embedding_table.weight"] = table.clone()
        for p in _PARAMS:
            for name, chunk in zip("qkv", state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{dst}attn1.to_{name}.{p}"] = chunk.clone()
            for ours, theirs in _BLOCK_KEYS:
                out[f"{dst}{theirs}.{p}"] = state[f"{src}{ours}.{p}"].clone()
    return out


def diffusers_config(model):
    """config.json contents of a `DiTTransformer2DModel` with the architecture of our `model`."""
    hidden = model.x_embedder.proj.out_channels
    heads = model.blocks[0].attn.num_heads
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": len(model.blocks),
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "num_embeds_ada_norm": model.num_classes,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "attention_bias": True,
    }


def spec_fields_from_config(config, source):
    """(depth, hidden, heads, patch, input_size, num_classes, in_channels, learn_sigma) from a diffusers config."""
    try:
        heads = int(config["num_attention_heads"])
        hidden = heads * int(config["attention_head_dim"])
        in_channels = int(config["in_channels"])
        out_channels = int(config.get("out_channels") or in_channels)
        return (int(config["num_layers"]), hidden, heads, int(config["patch_size"]), int(config["sample_size"]),
                int(config["num_embeds_ada_norm"]), in_channels, out_channels == 2 * in_channels)
    except (KeyError, TypeError, ValueError) as e:
        kind = config.get("_class_name") if isinstance(config, dict) else None
        if kind and kind not in ("DiTTransformer2DModel", "Transformer2DModel"):  # another family's transformer
            raise UserError(f"{source}: a {kind} config, not a DiT's: give the pipeline directory that holds "
                            "model_index.json (with --backend auto, not vq4dit, which maps DiT weights only)") from None
        raise UserError(f"{source}: not a diffusers DiT config (missing or bad field {e})") from None
