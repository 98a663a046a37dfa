"""Key-map completeness against the real architectures (meta device) and the tiny layouts."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from lora_parity.convert.keymap import KeyMap, keymap_for
from lora_parity.convert.layout import (CLIP_BIGG_CONFIG, CLIP_L_CONFIG, PRESETS, SDXL_BASE_UNET_CONFIG,
                                SDXL_REFINER_UNET_CONFIG, ModelLayout, UNetLayout, sdxl_text_encoders)
from lora_parity.convert.tiny import TINY_TE1_CONFIG, TINY_TE2_CONFIG, TINY_UNET_CONFIG

from .helpers import meta_text_encoder, meta_unet, torch_modules

pytestmark = pytest.mark.conversion

MINDONE_DEFAULT_MODULES = 560  # q/k/v/out of all 70 SDXL-base transformer blocks (public fact)


def _unet_diffs(km: KeyMap, unet) -> tuple[set, set, list, list]:
    mods = torch_modules(unet, "unet.")
    ours = {d: e for d, (e, _) in km.by_diffusers.items() if e.component == "unet"}
    shape = [d for d, e in ours.items() if d in mods and tuple(mods[d].weight.shape) != e.weight_shape()]
    bias = [d for d, e in ours.items() if d in mods and e.kind != "norm"
            and (getattr(mods[d], "bias", None) is not None) != e.bias]
    return set(mods) - set(ours), set(ours) - set(mods), shape, bias


@pytest.mark.parametrize("preset,config", [("sdxl-base", SDXL_BASE_UNET_CONFIG),
                                           ("sdxl-refiner", SDXL_REFINER_UNET_CONFIG)])
def test_unet_map_equals_diffusers_architecture(preset, config):
    missing, extra, shape, bias = _unet_diffs(keymap_for(PRESETS[preset]), meta_unet(config))
    assert not missing, f"diffusers modules without a map entry: {sorted(missing)[:5]}"
    assert not extra, f"map entries diffusers does not have: {sorted(extra)[:5]}"
    assert not shape, f"shape mismatches: {shape[:5]}"
    assert not bias, f"bias mismatches: {bias[:5]}"


def test_sdxl_base_mindone_default_is_560_attention_modules():
    km = keymap_for(PRESETS["sdxl-base"])
    att = km.attention_entries()
    assert len(att) == MINDONE_DEFAULT_MODULES
    unet = meta_unet(SDXL_BASE_UNET_CONFIG)
    linear = {n for n, m in torch_modules(unet, "unet.", kinds=("Linear",)).items()
              if ".attn1." in n or ".attn2." in n}
    assert len(linear) == MINDONE_DEFAULT_MODULES
    assert {e.diffusers[0] for e in att} == linear
    # rank-4 fp32 bytes: sum over modules of 4 * (in + out) * 4 bytes, "about 24 MB"
    nbytes = sum(4 * (e.in_features + e.out_features) * 4 for e in att)
    assert 23e6 < nbytes < 25e6


def test_upsampler_index_is_2_conv_in_attention_output_blocks():
    km = keymap_for(PRESETS["sdxl-base"])
    ups = {e.sgm: e.diffusers[0] for e in km.entries if "upsamplers" in e.diffusers[0]}
    assert ups == {
        "model.diffusion_model.output_blocks.2.2.conv": "unet.up_blocks.0.upsamplers.0.conv",
        "model.diffusion_model.output_blocks.5.2.conv": "unet.up_blocks.1.upsamplers.0.conv",
    }
    e = km.by_sgm["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    assert e.diffusers == ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",)


@pytest.mark.parametrize("cfg,projection,preset_index", [(CLIP_L_CONFIG, False, 0), (CLIP_BIGG_CONFIG, True, 1)])
def test_text_encoder_maps_equal_transformers_architecture(cfg, projection, preset_index):
    te = PRESETS["sdxl-base"].text_encoders[preset_index]
    km = keymap_for(PRESETS["sdxl-base"])
    model = meta_text_encoder({**cfg, "vocab_size": 49408}, projection=projection)
    mods = torch_modules(model, te.diffusers_prefix, kinds=("Linear", "LayerNorm"))
    if not hasattr(model, "text_model"):  # transformers 5 flattens CLIPTextModel; files keep "text_model."
        mods = {k.replace(te.diffusers_prefix, te.diffusers_prefix + "text_model.", 1): m for k, m in mods.items()}
    mods.pop(te.diffusers_prefix + "text_projection", None)  # a parameter in SGM, not a LoRA target
    ours = {d: e for d, (e, _) in km.by_diffusers.items() if d.startswith(te.diffusers_prefix)
            and e.component == te.diffusers_prefix.rstrip(".")}
    assert set(mods) == set(ours)
    for d, (e, part) in ((d, km.by_diffusers[d]) for d in ours):
        rows = e.weight_shape()[0] // len(e.diffusers)
        assert tuple(mods[d].weight.shape) == (rows, *e.weight_shape()[1:]), d


def test_bigg_fused_in_proj_names():
    km = keymap_for(PRESETS["sdxl-base"])
    e = km.by_sgm["conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj"]
    assert e.diffusers == tuple(f"text_encoder_2.text_model.encoder.layers.7.self_attn.{p}_proj" for p in "qkv")
    assert e.out_features == 3 * e.in_features
    assert km.by_sgm["conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc1"].diffusers == (
        "text_encoder.text_model.encoder.layers.3.mlp.fc1",)
    refiner = keymap_for(PRESETS["sdxl-refiner"])
    assert "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj" in refiner.by_sgm
    assert not any(e.component == "text_encoder" for e in refiner.entries)


def test_every_name_is_unique_in_every_space():
    for preset in PRESETS.values():
        km = keymap_for(preset)
        lora = km.lora_entries()
        assert len(km.by_sgm) == len(km.entries)
        assert len(km.by_diffusers) == sum(len(e.diffusers) for e in km.entries)
        sgm_kohya = {k for k, (e, _) in km.by_kohya.items()}
        assert len(sgm_kohya) >= sum(len(e.diffusers) for e in lora)


def test_tiny_layout_from_config_matches_tiny_diffusers_unet():
    layout = ModelLayout("tiny", UNetLayout.from_diffusers_config(TINY_UNET_CONFIG),
                         sdxl_text_encoders(TINY_TE1_CONFIG, TINY_TE2_CONFIG))
    missing, extra, shape, bias = _unet_diffs(keymap_for(layout), meta_unet(TINY_UNET_CONFIG))
    assert not (missing or extra or shape or bias)


# Random SDXL-family UNets: the generator must agree with diffusers on any of them.
@st.composite
def unet_configs(draw):
    levels = draw(st.integers(2, 4))
    mc = draw(st.sampled_from([8, 16]))
    mult = [1] + [draw(st.sampled_from([1, 2, 3])) for _ in range(levels - 1)]
    attn = [draw(st.booleans()) for _ in range(levels)]
    depth = [draw(st.integers(1, 3)) for _ in range(levels)]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    return {
        "block_out_channels": [mc * m for m in mult], "layers_per_block": draw(st.integers(1, 3)),
        "down_block_types": down, "up_block_types": up, "transformer_layers_per_block": depth,
        "attention_head_dim": [1] * levels, "cross_attention_dim": draw(st.sampled_from([8, 24])),
        "norm_num_groups": 4, "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 4, "projection_class_embeddings_input_dim": 40,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
    }


@given(unet_configs())
def test_generated_map_matches_diffusers_for_random_layouts(cfg):
    layout = ModelLayout("random", UNetLayout.from_diffusers_config(cfg))
    missing, extra, shape, bias = _unet_diffs(KeyMap(layout), meta_unet(cfg))
    assert not (missing or extra or shape or bias), (missing, extra, shape, bias)
