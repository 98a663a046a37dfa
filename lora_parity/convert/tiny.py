"""The built-in tiny SDXL (and SD 1.x / 2.x): diffusers configs shared by fixtures, both backends and tests.

Plain data with no imports: :mod:`lora_parity.convert.layout` builds the tiny layouts from these
(``tiny_layout``, ``tiny_refiner_layout``, ``tiny_sd_layout``), so the two modules never import each other.

Sized for a 2-core CPU where MindSpore's Conv2D is ~120x slower than torch's:
two UNet levels with 32/64 channels on 16x16 latents, 3-layer text encoders.
It keeps every SDXL feature that names or numerics depend on: a level without
attention, transformer depth > 1, linear projections, GEGLU, text_time
conditioning, two text encoders (quick_gelu CLIP-L style, gelu bigG style).
"""
from __future__ import annotations

TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 6 * 8 + TE2 projection_dim 32
}

TINY_TE1_CONFIG = {  # CLIP-L style (transformers CLIPTextConfig)
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "vocab_size": 514,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
}

TINY_TE2_CONFIG = {  # OpenCLIP-bigG style, loaded as CLIPTextModelWithProjection
    **TINY_TE1_CONFIG,
    "hidden_act": "gelu",
}

TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.13025,
}

# The tiny SDXL refiner: bigG-style TE2 only (cross_attention_dim = its hidden size), attention on the
# middle level only (like the refiner's [0, 4, 4, 0]), depth 2, aesthetic-score conditioning:
# 5 size/crop/aesthetic numbers * addition_time_embed_dim + TE2 projection_dim.
TINY_REFINER_UNET_CONFIG = {
    **TINY_UNET_CONFIG,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": 2,
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": TINY_TE2_CONFIG["hidden_size"],
    "projection_class_embeddings_input_dim": 5 * TINY_UNET_CONFIG["addition_time_embed_dim"]
    + TINY_TE2_CONFIG["projection_dim"],
}

TINY_LATENT_SHAPE = (1, 4, 16, 16)
TINY_IMAGE_SIZE = 32


# Tiny SD 1.x / 2.x (one text encoder, no size conditioning): SD 1.x projects into its transformers with
# 1x1 convs and counts attention heads (``attention_head_dim`` is a head count there), SD 2.x projects
# linearly with 64-wide heads in the real model; its text encoder is OpenCLIP-H (gelu) seen as HF CLIP.
TINY_SD1_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 2,
    "cross_attention_dim": TINY_TE1_CONFIG["hidden_size"],
    "norm_num_groups": 8,
    "use_linear_projection": False,
}
TINY_SD2_UNET_CONFIG = {**TINY_SD1_UNET_CONFIG, "attention_head_dim": [2, 4], "use_linear_projection": True}
TINY_SD2_TE_CONFIG = {**TINY_TE1_CONFIG, "hidden_act": "gelu"}
TINY_SD_CONFIGS = {"sd1": (TINY_SD1_UNET_CONFIG, TINY_TE1_CONFIG), "sd2": (TINY_SD2_UNET_CONFIG, TINY_SD2_TE_CONFIG)}


# Tiny SD3 (MMDiT, SD3-medium features) and Flux (double + single stream blocks, guidance embedding as
# FLUX.1-dev): both denoise 16-channel latents; their text encoders are CLIP (SD3: CLIP-L and CLIP-G,
# both with projection; Flux: CLIP-L pooled only) and a T5 v1.1 encoder (gated-gelu). The T5 width is the
# transformers' joint_attention_dim; SD3 pads CLIP-L + CLIP-G hidden states (32 + 32) up to it.
TINY_T5_CONFIG = {  # transformers T5Config of a T5EncoderModel (T5 v1.1 style)
    "vocab_size": 300,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "layer_norm_epsilon": 1e-6,
}
TINY_SD3_CLIP_CONFIG = {**TINY_TE1_CONFIG, "hidden_act": "quick_gelu"}   # CLIP-L with projection
TINY_SD3_CLIP_G_CONFIG = {**TINY_TE1_CONFIG, "hidden_act": "gelu"}        # CLIP-G (bigG style) with projection
TINY_SD3_TRANSFORMER_CONFIG = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": TINY_T5_CONFIG["d_model"],
    "caption_projection_dim": 32,  # heads * head dim
    "pooled_projection_dim": 2 * TINY_TE1_CONFIG["projection_dim"],
    "pos_embed_max_size": 32,
}
TINY_FLUX_TRANSFORMER_CONFIG = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_T5_CONFIG["d_model"],
    "pooled_projection_dim": TINY_TE1_CONFIG["hidden_size"],  # CLIPTextModel's pooled output
    "guidance_embeds": True,
    "axes_dims_rope": [4, 4, 8],  # sums to the head dim
}
TINY_FLOW_VAE_CONFIG = {  # the tiny VAE with SD3/Flux's 16 latent channels, no quant convs, a shift
    **TINY_VAE_CONFIG,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_SD3_VAE_CONFIG = {**TINY_FLOW_VAE_CONFIG, "scaling_factor": 1.5305, "shift_factor": 0.0609}
TINY_FLUX_VAE_CONFIG = {**TINY_FLOW_VAE_CONFIG, "scaling_factor": 0.3611, "shift_factor": 0.1159}
