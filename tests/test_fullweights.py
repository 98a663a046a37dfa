"""Full-model weight conversion diffusers <-> SGM: complete, named as the MindSpore cells are, bitwise."""
from __future__ import annotations


import numpy as np
import pytest

from lora_parity.errors import KeyMapError
from lora_parity.fixtures.bundle import pipeline_state_dict
from lora_parity.convert.fullweights import (VaeLayout, diffusers_to_sgm, normalize_diffusers_names, param_maps,
                                     sgm_only_params, sgm_to_diffusers)
from lora_parity.convert.layout import PRESETS, SDXL_BASE_UNET_CONFIG
from lora_parity.convert.tiny import TINY_VAE_CONFIG

from . import faults
from .helpers import meta_text_encoder, meta_unet

pytestmark = pytest.mark.conversion

VAE_ENCODER = ("first_stage_model.encoder.", "first_stage_model.quant_conv.")


@pytest.fixture(scope="module")
def tiny_sd(tiny_pipeline_dir):
    return pipeline_state_dict(tiny_pipeline_dir)


def _maps(layout, vae_cfg):
    return param_maps(layout, VaeLayout.from_diffusers_config(vae_cfg))


def test_tiny_round_trip_is_bitwise_both_ways(tiny_sd, tiny_layout):
    maps = _maps(tiny_layout, TINY_VAE_CONFIG)
    sgm = diffusers_to_sgm(tiny_sd, maps)
    back = sgm_to_diffusers(sgm, maps)
    ref = {k: v for k, v in normalize_diffusers_names(tiny_sd).items() if not k.endswith("position_ids")}
    assert set(back) == set(ref)
    assert all(back[k].dtype == ref[k].dtype and np.array_equal(back[k], ref[k]) for k in ref)
    again = diffusers_to_sgm(back, maps)
    assert set(again) == set(sgm) and all(np.array_equal(again[k], sgm[k]) for k in sgm)


def test_special_rules(tiny_sd, tiny_layout):
    sgm = diffusers_to_sgm(tiny_sd, _maps(tiny_layout, TINY_VAE_CONFIG))
    p = "conditioner.embedders.1.model."
    sd = normalize_diffusers_names(tiny_sd)
    assert np.array_equal(sgm[p + "text_projection"], sd["text_encoder_2.text_projection.weight"].T)
    q, k, v = (sd[f"text_encoder_2.text_model.encoder.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    assert np.array_equal(sgm[p + "transformer.resblocks.0.attn.in_proj_weight"], np.concatenate([q, k, v]))
    w = sd["vae.decoder.mid_block.attentions.0.to_q.weight"]
    assert sgm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (*w.shape, 1, 1)
    # reversed VAE decoder blocks: diffusers up_blocks.0 is SGM's deepest level
    assert np.array_equal(sgm["first_stage_model.decoder.up.1.block.0.conv1.weight"],
                          sd["vae.decoder.up_blocks.0.resnets.0.conv1.weight"])
    assert sgm["model.diffusion_model.out.0.gamma"].shape == sd["unet.conv_norm_out.weight"].shape


@pytest.mark.parametrize("preset", ["sdxl-base", "sdxl-refiner"])
def test_names_equal_the_mindspore_cells(preset):
    pytest.importorskip("mindspore")
    from lora_parity.backends.port.model import SDXL_VAE_CONFIG, param_shapes

    layout = PRESETS[preset]
    shapes = param_shapes(layout, vae_config=SDXL_VAE_CONFIG)
    ours = {m.sgm for m in _maps(layout, SDXL_VAE_CONFIG)} | set(sgm_only_params(layout))
    ours = {n for n in ours if not n.startswith(VAE_ENCODER)}
    assert set(shapes) == ours


def test_sdxl_base_covers_every_diffusers_weight():
    """Every parameter of diffusers' real SDXL-base UNet and both CLIP encoders has an SGM name."""
    from lora_parity.convert.layout import CLIP_BIGG_CONFIG, CLIP_L_CONFIG

    layout = PRESETS["sdxl-base"]
    sd = {f"unet.{k}": None for k, _ in meta_unet(SDXL_BASE_UNET_CONFIG).named_parameters()}
    sd.update({f"text_encoder.{k}": None for k, _ in meta_text_encoder(
        {**CLIP_L_CONFIG, "vocab_size": 49408}, projection=False).named_parameters()})
    sd.update({f"text_encoder_2.{k}": None for k, _ in meta_text_encoder(
        {**CLIP_BIGG_CONFIG, "vocab_size": 49408}, projection=True).named_parameters()})
    names = set(normalize_diffusers_names(sd))
    mapped = {d for m in param_maps(layout) for d in m.diffusers}
    assert names - mapped == set()
    assert mapped - names == set()


def test_missing_and_leftover_weights_are_errors(tiny_sd, tiny_layout):
    maps = _maps(tiny_layout, TINY_VAE_CONFIG)
    broken = dict(tiny_sd)
    broken.pop("unet.conv_in.weight")
    with pytest.raises(KeyMapError, match="conv_in.weight"):
        diffusers_to_sgm(broken, maps)
    extra = dict(tiny_sd)
    extra["unet.some_new_layer.weight"] = np.zeros(1, np.float32)
    with pytest.raises(KeyMapError, match="some_new_layer"):
        diffusers_to_sgm(extra, maps)


def test_conversion_faults_change_the_weights(tiny_sd, tiny_layout):
    """The base-weight faults used by the parity layer really alter the converted weights."""
    sgm = diffusers_to_sgm(tiny_sd, _maps(tiny_layout, TINY_VAE_CONFIG))
    p = "conditioner.embedders.1.model."
    assert not np.array_equal(faults.untransposed_text_projection(sgm, p)[p + "text_projection"],
                              sgm[p + "text_projection"])
    key = p + "transformer.resblocks.0.attn.in_proj_weight"
    assert not np.array_equal(faults.qkv_wrong_order(sgm, p)[key], sgm[key])
