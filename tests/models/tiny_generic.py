"""Tiny pipelines of families without a dedicated adapter (the generic one, models/adapters/generic.py), random
weights, built offline in the tests: SANA, Qwen-Image, Chroma, Lumina2 (images), Wan and CogVideoX (videos).

Text encoders are the families' own classes (Gemma2, Qwen2.5-VL, T5, UMT5) at one or two layers of width 16; every
tokenizer is tiny_t2i's T5 tokenizer over a hand-written vocabulary (a pipeline only calls it, whatever its class).
Transformers have two blocks per block list and 8 x 8 (video: 2 x 8 x 8) latents.
"""
import torch

from tests.models.tiny_pipelines import randomize
from tests.models.tiny_t2i import HIDDEN, t5_encoder, t5_tokenizer, tiny_vae


def gemma2(tokenizer, seed):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    return Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32, head_dim=8,
                                    num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                                    attn_implementation="eager")).eval()


def qwen25vl(tokenizer, seed):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": HIDDEN, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": HIDDEN},
        vocab_size=len(tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def umt5(tokenizer, d_model, seed):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=2, relative_attention_num_buckets=8)).eval()


def sana_pipeline(seed=0):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                         cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=HIDDEN,
                                         sample_size=8)
    torch.manual_seed(0)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    tokenizer = t5_tokenizer()
    return SanaPipeline(tokenizer=tokenizer, text_encoder=gemma2(tokenizer, seed + 1), vae=vae.eval(),
                        transformer=randomize(transformer, seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def qwenimage_pipeline(seed=0):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=HIDDEN, guidance_embeds=False,
                                              axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tokenizer = t5_tokenizer()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(),
                             text_encoder=qwen25vl(tokenizer, seed + 1), tokenizer=tokenizer,
                             transformer=randomize(transformer, seed))


def chroma_pipeline(seed=0):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                           approximator_hidden_dim=16, approximator_layers=1)
    tokenizer = t5_tokenizer()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(1, shift_factor=0.0),
                          text_encoder=t5_encoder(tokenizer, 32, seed + 1), tokenizer=tokenizer,
                          transformer=randomize(transformer, seed))


def lumina2_pipeline(seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    transformer = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
                                            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                                            multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(320, 16, 16),
                                            cap_feat_dim=HIDDEN)
    tokenizer = t5_tokenizer()
    return Lumina2Pipeline(transformer=randomize(transformer, seed), scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=tiny_vae(4, shift_factor=0.0), text_encoder=gemma2(tokenizer, seed + 1),
                           tokenizer=tokenizer)


def wan_pipeline(seed=0):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tokenizer = t5_tokenizer()
    return WanPipeline(tokenizer=tokenizer, text_encoder=umt5(tokenizer, 32, seed + 1), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=randomize(transformer, seed))


def cogvideox_pipeline(seed=0):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=32, num_layers=2,
                                              sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=226)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4)
    tokenizer = t5_tokenizer()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=t5_encoder(tokenizer, 32, seed + 1), vae=vae.eval(),
                             transformer=randomize(transformer, seed), scheduler=CogVideoXDDIMScheduler())


BUILDERS = {"sana": sana_pipeline, "qwenimage": qwenimage_pipeline, "chroma": chroma_pipeline,
            "lumina2": lumina2_pipeline, "wan": wan_pipeline, "cogvideox": cogvideox_pipeline}


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def zimage_pipeline(seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=48,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=HIDDEN, axes_dims=[8, 8, 8], axes_lens=[600, 16, 16])
    tokenizer = t5_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # Z-Image wraps prompts in its text encoder's chat template
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=8)).eval()
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(4, shift_factor=0.0),
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=randomize(transformer, seed))


BUILDERS["zimage"] = zimage_pipeline

# per family: the teacher's size (pixels; frames for videos), each the smallest the pipeline accepts with a few tokens
SIZES = {"sana": dict(height=32, width=32), "qwenimage": dict(height=16, width=16), "chroma": dict(height=8, width=8),
         "zimage": dict(height=16, width=16), "wan": dict(height=32, width=32, num_frames=5),
         "cogvideox": dict(height=32, width=32, num_frames=5)}
FAMILIES = list(SIZES)


def generic_run(family, root, **overrides):
    """tiny_t2i.quantized_run on the tiny `family` pipeline at its SIZES (once per test session and overrides)."""
    from tests.models.tiny_t2i import quantized_run

    return quantized_run(family, root, BUILDERS[family], **SIZES[family], **overrides)
