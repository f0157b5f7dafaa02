"""Flux.1 (FluxTransformer2DModel, FluxPipeline): dev, schnell and fine-tunes of them.

Blocks are transformer_blocks.{i} (dual-stream MM-DiT blocks), then single_transformer_blocks.{i} (one stream over
the joined text and image tokens), in that call order; both return (encoder_hidden_states, hidden_states) and share
the rotary table of the image and text positions. Quantized: in the dual blocks norm1.linear, norm1_context.linear,
attn.to_q / to_k / to_v / to_out.0, attn.add_q_proj / add_k_proj / add_v_proj / to_add_out, ff.* and ff_context.*;
in the single blocks norm.linear, attn.to_q / to_k / to_v, proj_mlp and proj_out. The embedders (x_embedder,
context_embedder, time_text_embed), norm_out and the final proj_out stay in full precision.

Guidance: Flux.1-dev is guidance-distilled: the scale is an input of the transformer (its guidance embedding), and
the batch is not doubled, so a trajectory is one row per step; schnell takes no guidance at all. The pipeline's
"true CFG" (a negative prompt with true_cfg_scale > 1) calls the transformer twice per step and is not used.
Activations of the released models pass fp16's range (diffusers clips them in fp16): cache in bf16.
"""
import torch

from vq4dit.models.adapters.t2i import TextToImageAdapter

DEFAULT_LATENT_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px images through the 8x VAE


class FluxAdapter(TextToImageAdapter):
    family = "flux"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    guided_batch = False
    text_tokens = 512  # T5 tokens (FluxPipeline's max_sequence_length)

    def latent_size(self, model):
        return DEFAULT_LATENT_SIZE

    def size_multiple(self, model):
        return 2 * model.config.patch_size  # 2x2 latent pixels are packed into one token

    def example_inputs(self, model, rows, latent_hw, tokens, device="meta"):
        c, stride = model.config, self.size_multiple(model)
        image_tokens = (latent_hw[0] // stride) * (latent_hw[1] // stride)
        out = {"hidden_states": torch.empty(rows, image_tokens, c.in_channels, device=device),
               "encoder_hidden_states": torch.empty(rows, tokens, c.joint_attention_dim, device=device),
               "pooled_projections": torch.empty(rows, c.pooled_projection_dim, device=device),
               "timestep": torch.empty(rows, device=device), "img_ids": torch.empty(image_tokens, 3, device=device),
               "txt_ids": torch.empty(tokens, 3, device=device)}
        if c.guidance_embeds:
            out["guidance"] = torch.empty(rows, device=device)
        return out

    def encode(self, pipe, prompts, device):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        return {"prompt_embeds": embeds.cpu(), "pooled_prompt_embeds": pooled.cpu()}
