"""SD 1.x and SD 2.x LoRAs through the converter (issue 15, first part): the key map generated from their
layouts, PEFT and kohya names that diffusers' own loader takes completely (merged deltas equal), bitwise
round trips, layout detection, and a planted naming fault that the delta check catches.

SD 1.x projects into its transformers with 1x1 convs (conv LoRA shapes), SD 2.x linearly; sd-scripts names
their UNets by diffusers names (``lora_unet_down_blocks_0_…``), the text encoder ``lora_te_``.
"""
from __future__ import annotations

import re

import pytest

from lora_parity.convert import formats
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.convert.layout import PRESETS
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.convert.tiny import tiny_sd_layout
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

from . import faults
from .test_diffusers_load import compare_deltas, load_into_pipeline, ms_side_deltas, pipeline_deltas

pytestmark = pytest.mark.conversion
FAMILIES = ("sd1", "sd2")
KOHYA_SD = re.compile(r"^lora_(unet_(conv_in|conv_out|(down_blocks|mid_block|up_blocks|time_embedding)_[a-z0-9_]+)"
                      r"|te_text_model_[a-z0-9_]+)\.(alpha|lora_down\.weight|lora_up\.weight)$")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, tiny pipeline folder, MindSpore-side LoRA file, its LoraSet): every LoRA-able module."""
    from lora_parity.fixtures.tiny_pipeline import build_tiny_sd_pipeline

    fam = request.param
    root = tmp_path_factory.mktemp(f"tiny_{fam}")
    pipe_dir = build_tiny_sd_pipeline(root / "pipe", fam)
    lora = make_lora(tiny_sd_layout(fam), rank=4, alpha=8.0, modules="all", seed=5)
    src = write_ms_lora(root / "lora.ckpt", lora)
    return fam, pipe_dir, src, lora


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_converted_sd_lora_loads_completely_in_diffusers(tmp_path, family, fmt):
    fam, pipe_dir, src, lora = family
    out = tmp_path / f"{fmt}.safetensors"
    report = convert(ConvertOptions(src=src, dst=out, fmt=fmt, layout=str(pipe_dir), alpha=8.0))
    assert report.modules == len(lora.pairs) and report.unmapped == []
    if fmt == "kohya":
        bad = [k for k in read_safetensors(out)[0] if not KOHYA_SD.match(k)]
        assert bad == [], bad[:3]
    truth = load_lora(src, layout=lora.layout, alpha=8.0)
    assert compare_deltas(ms_side_deltas(truth), pipeline_deltas(load_into_pipeline(pipe_dir, out))) == []


def test_sd_kohya_name_swap_is_caught(tmp_path, family, monkeypatch):
    """A writer that names attn1.to_q as attn1.to_k still loads completely; the deltas give it away."""
    fam, pipe_dir, src, lora = family
    q = next(p.module.sgm for p in lora.ordered() if p.module.sgm.endswith("attn1.to_q"))
    faults.plant_kohya_name_swap(monkeypatch, lora.layout, q, q[:-1] + "k")
    out = tmp_path / "swapped.safetensors"
    convert(ConvertOptions(src=src, dst=out, fmt="kohya", layout="tiny-" + fam, alpha=8.0))
    truth = load_lora(src, layout=lora.layout, alpha=8.0)
    problems = compare_deltas(ms_side_deltas(truth), pipeline_deltas(load_into_pipeline(pipe_dir, out)))
    assert any("attn1.to_q" in p for p in problems) and any("attn1.to_k" in p for p in problems), problems


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_sd_round_trip_is_bitwise(tmp_path, family, fmt):
    fam, _, src, lora = family
    mid = tmp_path / f"mid_{fmt}.safetensors"
    convert(ConvertOptions(src=src, dst=mid, fmt=fmt, layout="tiny-" + fam, alpha=8.0))
    again = tmp_path / "again.ckpt"
    convert(ConvertOptions(src=mid, dst=again, fmt="ms", layout="tiny-" + fam))
    back = load_lora(again, layout=lora.layout, alpha=8.0)
    assert set(back.pairs) == set(lora.pairs)
    assert all(p.A.bitwise_equal(back.pairs[n].A) and p.B.bitwise_equal(back.pairs[n].B)
               for n, p in lora.pairs.items())
    # and the PyTorch-side file itself: PyTorch -> MindONE -> PyTorch gives the same bytes
    convert(ConvertOptions(src=again, dst=tmp_path / "mid2.safetensors", fmt=fmt, layout="tiny-" + fam, alpha=8.0))
    one, two = read_safetensors(mid)[0], read_safetensors(tmp_path / "mid2.safetensors")[0]
    assert set(one) == set(two) and all(one[k].bitwise_equal(two[k]) for k in one)


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_real_size_sd_lora_layout_is_detected(tmp_path, preset):
    lora = make_lora(PRESETS[preset], rank=4, modules="all", seed=2)
    src = write_ms_lora(tmp_path / "lora.ckpt", lora)
    got = load_lora(src)
    assert got.layout.name == preset and "detected" in got.layout_note and len(got.pairs) == len(lora.pairs)
    out = tmp_path / "kohya.safetensors"
    convert(ConvertOptions(src=src, dst=out, fmt="kohya"))
    names = set(read_safetensors(out)[0])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in names
    assert load_lora(out).layout.name == preset


def test_sd1_proj_in_is_a_conv_lora(family):
    fam, _, _, lora = family
    p = next(p for n, p in lora.pairs.items() if n.endswith(".proj_in"))
    assert (len(p.A.shape), len(p.B.shape)) == ((4, 4) if fam == "sd1" else (2, 2))


def test_sd2_text_encoder_is_fused_on_the_mindone_side(family, tmp_path):
    """SD 2.x's OpenCLIP-H keeps q/k/v fused (``cond_stage_model.model.transformer.resblocks.N.attn.in_proj``);
    PEFT splits it into q/k/v_proj sharing lora_A."""
    fam, _, _, lora = family
    fused = [n for n in lora.pairs if n.endswith("attn.in_proj")]
    if fam == "sd1":
        assert fused == [] and any(n.startswith("cond_stage_model.transformer.text_model.") for n in lora.pairs)
        return
    assert fused and all(n.startswith("cond_stage_model.model.transformer.resblocks.") for n in fused)
    tensors, _ = formats.tensors_for(lora, "peft")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight" in tensors
    write_safetensors(tmp_path / "x.safetensors", tensors, {})
