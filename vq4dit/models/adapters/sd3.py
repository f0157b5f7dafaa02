"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, StableDiffusion3Pipeline).

Blocks are transformer_blocks.{i} (JointTransformerBlock, MM-DiT): two streams, image and text, each block returns
(encoder_hidden_states, hidden_states); the last block updates the image stream only. Quantized per block: adaLN
norm1.linear and norm1_context.linear, attention attn.to_q / to_k / to_v / to_out.0 and the text stream's
attn.add_q_proj / add_k_proj / add_v_proj / to_add_out, SD3.5's second self-attention attn2.* where present, and
the feed-forwards ff.* and ff_context.*. The patch and text embedders, time_text_embed, norm_out and proj_out stay
in full precision. The teacher is the pipeline's flow-matching Euler scheduler with classifier-free guidance
(negative prompt "", batched with the prompts), prompts encoded by both CLIPs and T5 (77 + 256 tokens).
"""
import json
from pathlib import Path

import torch

from vq4dit.models.adapters.t2i import NEGATIVE_PROMPT, TextToImageAdapter

CLIP_TOKENS, T5_TOKENS = 77, 256  # the CLIP tokenizers' length and StableDiffusion3Pipeline's max_sequence_length


class SD3Adapter(TextToImageAdapter):
    family = "sd3"
    block_lists = ("transformer_blocks",)
    text_tokens = CLIP_TOKENS + T5_TOKENS  # CLIP and T5 embeddings joined along the sequence

    def prompt_tokens(self, directory):
        try:
            clip = json.loads((Path(directory) / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
        except (OSError, ValueError, KeyError, TypeError):
            clip = CLIP_TOKENS
        return int(clip) + T5_TOKENS

    def example_inputs(self, model, rows, latent_hw, tokens, device="meta"):
        c = model.config
        return {"hidden_states": torch.empty(rows, c.in_channels, *latent_hw, device=device),
                "encoder_hidden_states": torch.empty(rows, tokens, c.joint_attention_dim, device=device),
                "pooled_projections": torch.empty(rows, c.pooled_projection_dim, device=device),
                "timestep": torch.empty(rows, device=device)}

    def encode(self, pipe, prompts, device):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.cpu(), "pooled_prompt_embeds": pooled.cpu()}

    def negative(self, pipe, device):
        out = self.encode(pipe, [NEGATIVE_PROMPT], device)
        return {"negative_prompt_embeds": out["prompt_embeds"], "negative_pooled_prompt_embeds":
                out["pooled_prompt_embeds"]}
