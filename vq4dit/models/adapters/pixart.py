"""PixArt-alpha / PixArt-Sigma (PixArtTransformer2DModel, PixArtAlphaPipeline / PixArtSigmaPipeline).

Blocks are transformer_blocks.{i} (BasicTransformerBlock, ada_norm_single). Quantized per block: self-attention
attn1.to_q / to_k / to_v / to_out.0, cross-attention attn2.to_q / to_k / to_v / to_out.0 (over T5 embeddings),
ff.net.0.proj and ff.net.2. The blocks hold no adaLN Linear: their modulation is a learned scale_shift_table plus
the shared adaLN-single timestep projection (adaln_single), which sits outside the blocks with the other embedders
(pos_embed, caption_projection) and the final proj_out, all in full precision. The teacher is the pipeline's own
DPM-Solver with classifier-free guidance (negative prompt ""), T5 prompts of 300 tokens (alpha: 120), no resolution
binning.
"""
import torch

from vq4dit.models.adapters.t2i import NEGATIVE_PROMPT, TextToImageAdapter
from vq4dit.models.pipelines import read_index

ALPHA_TOKENS = 120  # PixArtAlphaPipeline's max_sequence_length


class PixArtAdapter(TextToImageAdapter):
    family = "pixart"
    block_lists = ("transformer_blocks",)
    # prompts lowercased as given (caption cleaning needs bs4 and ftfy); sizes as asked (binning: 256/512/1024/2048
    # px models only)
    call_options = {"clean_caption": False, "use_resolution_binning": False}
    teacher_options = {"negative_prompt": None}  # its default "" may not come with negative_prompt_embeds
    text_tokens = 300  # T5 tokens (PixArtSigmaPipeline's max_sequence_length; PixArtAlphaPipeline's is 120)

    def prompt_tokens(self, directory):
        return ALPHA_TOKENS if read_index(directory)["_class_name"] == "PixArtAlphaPipeline" else self.text_tokens

    def example_inputs(self, model, rows, latent_hw, tokens, device="meta"):
        c = model.config
        return {"hidden_states": torch.empty(rows, c.in_channels, *latent_hw, device=device),
                "encoder_hidden_states": torch.empty(rows, tokens, c.caption_channels or c.cross_attention_dim,
                                                     device=device),
                "encoder_attention_mask": torch.ones(rows, tokens, device=device),
                "timestep": torch.empty(rows, device=device), "added_cond_kwargs": {
                    "resolution": torch.empty(rows, 2, device=device) if model.use_additional_conditions else None,
                    "aspect_ratio": torch.empty(rows, 1, device=device) if model.use_additional_conditions else None}}

    def encode(self, pipe, prompts, device):
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False)
        return {"prompt_embeds": embeds.cpu(), "prompt_attention_mask": mask.cpu()}

    def negative(self, pipe, device):
        out = self.encode(pipe, [NEGATIVE_PROMPT], device)
        return {"negative_prompt_embeds": out["prompt_embeds"],
                "negative_prompt_attention_mask": out["prompt_attention_mask"]}

    def prediction(self, model, output):
        sample = super().prediction(model, output)
        return sample[:, :model.config.in_channels]  # the noise; learned-sigma models append variance channels
