"""Tiny diffusers pipelines with random weights, built offline in the tests (configs: docs/method.md "The diffusers
DiT family")."""
import torch


def randomize(module, seed=0, std=0.1):
    """Seeded noise in every parameter (diffusers zero-initialises adaLN, which would make blocks identities)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def tiny_vae():
    """An AutoencoderKL with one block: latents are 4 x H x W for images 3 x H x W (no downsampling)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D"], block_out_channels=[8], layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=8).eval()


def tiny_dit_transformer(num_classes=1000, layers=2, heads=2, head_dim=8, seed=0):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
                                  num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes,
                                  norm_type="ada_norm_zero", norm_elementwise_affine=False,
                                  activation_fn="gelu-approximate", attention_bias=True)
    randomize(model, seed)
    for block in model.transformer_blocks[1:]:  # as in a trained DiT: every block holds the same embedder copy
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def save_tiny_dit_pipeline(path, num_classes=1000, layers=2, heads=2, head_dim=8):
    """A DiTPipeline (tiny DiT transformer, tiny VAE, DDPM scheduler) saved to `path`; returns the pipeline."""
    from diffusers import DDPMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=tiny_dit_transformer(num_classes, layers, heads, head_dim), vae=tiny_vae(),
                       scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe
