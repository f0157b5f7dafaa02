"""A diffusers-format export of a small DiT loads back to identical outputs; diffusers' own forward agrees."""
import pytest
import torch

from vq4dit.models.diffusers_format import diffusers_config, from_diffusers_state_dict, to_diffusers_state_dict
from vq4dit.models.loading import load_dit
from vq4dit.utils.errors import UserError

diffusers = pytest.importorskip("diffusers")


def diffusers_model(model):
    config = {k: v for k, v in diffusers_config(model).items() if not k.startswith("_")}
    theirs = diffusers.DiTTransformer2DModel(**config)
    theirs.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    return theirs.eval()


def inputs(model, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen)
    return x, torch.tensor([0, 517, 999])[:n], torch.tensor([2, 9, model.num_classes])[:n]


def match_original(theirs):
    """Undo diffusers' two documented deviations: freq denominator (half - 1) and norm eps 1e-5."""
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    for m in theirs.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    return theirs


def test_mapping_round_trip(tiny_latent_dit):
    model, _ = tiny_latent_dit
    state = model.state_dict()
    back = from_diffusers_state_dict(to_diffusers_state_dict(state))
    assert set(back) == set(state) - {"pos_embed"}
    for k, v in back.items():
        assert torch.equal(v, state[k]), k


@torch.no_grad()
def test_diffusers_forward_matches_ours(tiny_latent_dit):
    model, _ = tiny_latent_dit
    theirs = diffusers_model(model)
    # the fixed sin-cos table is not stored by diffusers; ours must be the same function
    torch.testing.assert_close(theirs.pos_embed.pos_embed, model.pos_embed, atol=1e-6, rtol=0)
    x, t, y = inputs(model)
    ours = model(x, t, y)
    default = theirs(x, timestep=t, class_labels=y).sample
    assert default.shape == ours.shape
    # with diffusers' defaults the outputs differ a little, not wildly
    rel = (default - ours).norm() / ours.norm()
    assert 0 < rel < 0.2
    exact = match_original(theirs)(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(exact, ours, atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["transformer_dir", "pipeline_dir"])
def test_diffusers_directory_loads_to_identical_outputs(tmp_path, tiny_latent_dit, layout):
    model, spec = tiny_latent_dit
    target = tmp_path / "transformer" if layout == "pipeline_dir" else tmp_path
    diffusers_model(model).save_pretrained(target)
    loaded, got = load_dit(None, str(tmp_path))
    assert got == spec
    x, t, y = inputs(model)
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    with pytest.raises(UserError, match="heads|does not match"):
        load_dit("DiT-S/2", str(tmp_path))


def test_different_embedder_copies_rejected(tiny_latent_dit):
    model, _ = tiny_latent_dit
    state = to_diffusers_state_dict(model.state_dict())
    state["transformer_blocks.3.norm1.emb.timestep_embedder.linear_1.bias"] += 1
    with pytest.raises(UserError, match="block 3"):
        from_diffusers_state_dict(state)


def test_another_familys_transformer_config_is_named_not_called_a_broken_dit():
    """An SD3 pipeline's transformer/ folder (a natural guess for --ckpt), or the pipeline with --backend vq4dit,
    read as 'not a diffusers DiT config (missing or bad field num_embeds_ada_norm)'; now the message names the class
    found and what to give (mutation: the class not looked at)."""
    from vq4dit.models.diffusers_format import spec_fields_from_config

    with pytest.raises(UserError, match=r"^dir: a SD3Transformer2DModel config, not a DiT's: give the pipeline "
                                        r"directory that holds model_index.json"):
        spec_fields_from_config({"_class_name": "SD3Transformer2DModel", "num_layers": 2}, "dir")
    with pytest.raises(UserError, match=r"^dir: not a diffusers DiT config \(missing or bad field 'patch_size'\)"):
        spec_fields_from_config({"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2,
                                 "attention_head_dim": 4, "in_channels": 4, "num_layers": 2}, "dir")
