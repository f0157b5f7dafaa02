"""Memory plans of FLUX.1-dev, Qwen-Image, SD3.5-large and Wan 2.1 14B (480p) at real size, streamed (--stream on)
and not, from config-only pipeline directories (no weights).

There is no internet here: each directory is one of the tests' tiny pipelines (tests/models/tiny_t2i.py,
tests/models/tiny_generic.py: their tokenizers over a hand-written vocabulary, their scheduler) with the published
configs written over the transformer's, the VAE's and the text encoders' (values below, from the hub repositories'
config.json files: black-forest-labs/FLUX.1-dev with openai/clip-vit-large-patch14 and google/t5-v1_1-xxl;
Qwen/Qwen-Image with Qwen2.5-VL-7B-Instruct; stabilityai/stable-diffusion-3.5-large with CLIP-L, OpenCLIP bigG and
T5-XXL; Wan-AI/Wan2.1-T2V-14B-Diffusers with UMT5-XXL), and every weight file deleted. The streamed plans count the
teacher on the host in bf16, the dtype these checkpoints store. Wan is planned at 832x480, 81 frames, with a
calibration set sized for video (WAN_VIDEO: 4 trajectories x 8 kept steps = 32 points of 32,760
tokens). Prompt lengths: Flux pads T5 prompts
to 512 (as the real one); Qwen-Image pads to the longest prompt, which under the tiny vocabulary is shorter than
the real tokenizer's (a few tokens against tens: under 1% of its 4,096 image tokens).

    python benchmarks/plan_real_size.py --out /tmp/vq4dit_real_size     # writes the directories, prints the plans
    python benchmarks/plan_real_size.py --out /tmp/vq4dit_real_size --step-dtype bf16   # the updates under autocast
    python quantize.py --config flux_dev_w2 --ckpt /tmp/vq4dit_real_size/flux_dev --device cuda --dry-run \
        --stream on
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLUX_TRANSFORMER = dict(
    _class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=[16, 56, 56])
FLUX_VAE = dict(
    _class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408, hidden_size=768,
              intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
              projection_dim=768, hidden_act="quick_gelu", dtype="bfloat16")
T5_XXL = dict(architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
              num_layers=24, num_heads=64, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              dtype="bfloat16")
QWEN_TRANSFORMER = dict(
    _class_name="QwenImageTransformer2DModel", patch_size=2, in_channels=64, out_channels=16, num_layers=60,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
    axes_dims_rope=[16, 56, 56])
QWEN_VAE = dict(
    _class_name="AutoencoderKLQwenImage", base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, latents_mean=[0.0] * 16,
    latents_std=[1.0] * 16)
QWEN25_VL_7B = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", vocab_size=152064,
    tie_word_embeddings=False, dtype="bfloat16",
    text_config=dict(model_type="qwen2_5_vl_text", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, tokens_per_second=2))


SD35_LARGE_TRANSFORMER = dict(
    _class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
    attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")
SD3_VAE = {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
CLIP_L_PROJECTION = {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"]}
CLIP_G = dict(architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model", vocab_size=49408,
              hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", dtype="bfloat16")
WAN_14B_TRANSFORMER = dict(
    _class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128,
    in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_VAE = dict(
    _class_name="AutoencoderKLWan", base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
UMT5_XXL = dict(architectures=["UMT5EncoderModel"], model_type="umt5", vocab_size=256384, d_model=4096, d_kv=64,
                d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, dtype="bfloat16")
# Wan 2.1 at 480p: 81 frames of 832x480, its 50 steps at guidance 5 (CFG doubles the batch); 4 trajectories x 8
# kept steps: each point is 21 x 30 x 52 = 32,760 tokens (one Flux image is 4,096)
MICRO_BATCHES = (16, 8, 4, 2, 1)  # rows per micro-batch of the streamed table (the presets' batch is 16)
WAN_VIDEO = dict(height=480, width=832, num_frames=81, steps=50, cfg_scale=5.0, calib_samples=4, calib_timesteps=8)


def write_config_only(pipe, directory, configs):
    """Save the tiny pipeline `pipe` to `directory`, write `configs` {subfolder: config dict} over its components'
    configs, and delete every weight file."""
    pipe.save_pretrained(str(directory), safe_serialization=True)
    for sub, config in configs.items():
        (directory / sub / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    for path in directory.rglob("*"):
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".safetensors.index.json"):
            path.unlink()


def build(out):
    """The config-only directories under `out`: {name: path}."""
    from tests.models.tiny_generic import qwenimage_pipeline, wan_pipeline
    from tests.models.tiny_t2i import flux_pipeline, sd3_pipeline

    dirs = {name: out / name for name in ("flux_dev", "qwen_image", "sd35_large", "wan21_14b")}
    write_config_only(flux_pipeline(), dirs["flux_dev"], {"transformer": FLUX_TRANSFORMER, "vae": FLUX_VAE,
                                                          "text_encoder": CLIP_L, "text_encoder_2": T5_XXL})
    write_config_only(qwenimage_pipeline(), dirs["qwen_image"], {"transformer": QWEN_TRANSFORMER, "vae": QWEN_VAE,
                                                                 "text_encoder": QWEN25_VL_7B})
    write_config_only(sd3_pipeline(), dirs["sd35_large"], {
        "transformer": SD35_LARGE_TRANSFORMER, "vae": SD3_VAE, "text_encoder": CLIP_L_PROJECTION,
        "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL})
    write_config_only(wan_pipeline(), dirs["wan21_14b"], {"transformer": WAN_14B_TRANSFORMER, "vae": WAN_VAE,
                                                          "text_encoder": UMT5_XXL})
    return dirs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/vq4dit_real_size", help="where the directories and plans go")
    parser.add_argument("--config", default="flux_dev_w2", help="the preset all are planned with (W2, 448 points; "
                        "Wan: with WAN_VIDEO's settings over it)")
    parser.add_argument("--step-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="the calibration updates' dtype (bf16: their forward under autocast)")
    args = parser.parse_args()
    from vq4dit.jobs.config import load_config
    from vq4dit.jobs.memory_plan import dry_run_plan, plan_for

    out = Path(args.out)
    table = ["| streamed, rows per micro-batch | " + " | ".join(map(str, MICRO_BATCHES)) + " |",
             "|---|" + "---|" * len(MICRO_BATCHES)]
    for name, directory in build(out).items():
        video = WAN_VIDEO if name.startswith("wan") else {}
        for stream in ("off", "on"):
            config = load_config(args.config, overrides={"ckpt": str(directory), "device": "cuda", "stream": stream,
                                                         "step_dtype": args.step_dtype, **video})
            print(dry_run_plan(config, out / f"{name}_stream_{stream}.json"))
        peaks = []
        for rows in MICRO_BATCHES:
            config = load_config(args.config, overrides={"ckpt": str(directory), "device": "cuda", "stream": "on",
                                                         "micro_batch": rows, "step_dtype": args.step_dtype,
                                                         **video})
            peaks.append(plan_for(config).peaks.device_peak.device_bytes / 2**30)
        table.append(f"| {name} | " + " | ".join(f"{p:.1f}" for p in peaks) + " |")
    print("device peak (GiB) of the streamed run by --micro-batch:\n" + "\n".join(table))


if __name__ == "__main__":
    main()
