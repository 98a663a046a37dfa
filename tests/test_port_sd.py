"""SD 1.x / 2.x on the port (issue 15): MindONE's older LDM LoRA ``.ckpt`` compared with the default backend.

The port runs MindONE's LDM ``UNetModel`` (SD 1.x: a fixed head count, 1x1-conv projections; SD 2.x: head size,
linear projections, v-prediction) and its ``TextEncoder`` (fused ``attn.attn.in_proj``), the LoRA injected as
MindONE's ``LoRADenseLayer`` names it (``lora_down`` / ``lora_up``, ``--lora_scale``).  The LoRA file is built
with MindONE's names (``tests.test_families.write_mindone_ldm_lora``: UNet attention q/k/v/out, the text
encoder's fused ``in_proj`` and ``out_proj``), not by our writer.  A clean run passes (layers replayed and
chained, the LoRA's effect, a 2-step image); realistic faults on the PyTorch side -- q/k swapped in one UNet
block, the text encoder's LoRA dropped -- fail with exit 1 naming the block that holds them.  One generated
base per family for the whole module.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_parity.convert import formats
from lora_parity.convert.converter import load_lora
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.convert.safetensors_io import write_safetensors

from . import faults
from .helpers import run_cli

pytestmark = pytest.mark.parity
FAMILIES = ("tiny-sd1", "tiny-sd2")
LORA_SCALE = "0.5"  # MindONE's --lora_scale: not in the file, given to compare as --lora-scale


@pytest.fixture(scope="module", params=FAMILIES)
def sd(request, tmp_path_factory):
    """(base spec, cache, pipeline folder, MindONE LDM LoRA .ckpt, weight variant)."""
    from lora_parity.bases import resolve_base
    from lora_parity.fixtures.synthetic import make_lora

    from .test_families import ldm_module_names, write_mindone_ldm_lora

    root = tmp_path_factory.mktemp(f"port_{request.param}")
    spec, cache = f"random:{request.param}", root / "cache"
    base = resolve_base(spec, cache=cache)
    layout = layout_from_pipeline_dir(base.pipeline_dir)
    ckpt = write_mindone_ldm_lora(root / "mindone_sd_lora.ckpt",
                                  make_lora(layout, rank=4, modules=ldm_module_names(layout), seed=12))
    return spec, cache, base.pipeline_dir, ckpt, base.variant


def _compare(sd, tmp_path, *extra):
    spec, cache, _, ckpt, _ = sd
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", "--base", spec, "--cache", str(cache), "--ms-lora", str(ckpt),
                              "--lora-scale", LORA_SCALE, "--report", str(report), "--quiet", *extra])
    data = json.loads((report / "report.json").read_text()) if (report / "report.json").is_file() else None
    return code, out + err, data


def _faulty(sd, tmp_path, fault) -> Path:
    """The PyTorch side's LoRA: the .ckpt read at its scale, a fault applied, written as PEFT."""
    _, _, pipe_dir, ckpt, _ = sd
    good = load_lora(ckpt, layout=layout_from_pipeline_dir(pipe_dir), lora_scale=float(LORA_SCALE))
    out = tmp_path / "pt_side.safetensors"
    write_safetensors(out, *formats.tensors_for(fault(good), "peft"))
    return out


def test_the_port_holds_mindone_ldm_names(sd):
    """Every base weight comes from the diffusers folder under MindONE's LDM names, and every LoRA tensor of
    the file lands on a parameter of that name (``lora_down`` / ``lora_up``, the fused ``in_proj``)."""
    from lora_parity.backends.port.lora import inject_lora
    from lora_parity.backends.port.text import build_text_encoder
    from lora_parity.backends.port.unet import UNetModel
    from lora_parity.bases.sources import DiffusersFolderWeights
    from lora_parity.convert import ckpt_io

    _, _, pipe_dir, ckpt, variant = sd
    layout = layout_from_pipeline_dir(pipe_dir)
    cells = [UNetModel(layout.unet, family=layout.family),
             build_text_encoder(layout.text_encoders[0], json.loads((pipe_dir / "text_encoder" / "config.json")
                                                                    .read_text()))]
    base_names = {p.name for c in cells for p in c.get_parameters()}
    assert base_names <= DiffusersFolderWeights(pipe_dir, variant).names()
    lora = {k: t.to_float("float32") for k, t in ckpt_io.read_ckpt(ckpt).items() if k != "lora_rank"}
    for c in cells:
        inject_lora(c, lora)
    landed = {p.name for c in cells for p in c.get_parameters()} - base_names
    assert landed == set(lora)
    assert any(".attn.attn.in_proj.lora_down.weight" in k for k in landed)


def test_ldm_ckpt_passes_on_the_port(sd, tmp_path):
    code, text, report = _compare(sd, tmp_path, "--steps", "2")
    assert code == 0, text[-3000:]
    assert report["meta"]["backend"] == "port"
    layers = report["layers"]
    kinds = {(r["component"], r["kind"]) for r in layers}
    assert {("text_encoder", "local"), ("unet", "local"), ("unet", "chained"), ("vae", "local")} <= kinds
    effects = [r for r in layers if r["kind"] == "effect" and r["effect_size"]]
    assert any(r["component"] == "text_encoder" for r in effects) and any(r["component"] == "unet" for r in effects)
    assert report["image"]["passed"]


def test_qk_swap_in_one_unet_block_fails_naming_it(sd, tmp_path):
    block = "input_blocks.1"  # the first down block's attention (diffusers: down_blocks.0.attentions.0)
    bad = _faulty(sd, tmp_path, lambda lo: faults.swap_projections(lo, block))
    code, text, report = _compare(sd, tmp_path, "--pt-lora", str(bad))
    assert code == 1, text[-3000:]
    first = report["first_diverging_layer"]
    assert first["diffusers"] == "unet.down_blocks.0.attentions.0", first
    assert first["sgm"] == "model.diffusion_model.input_blocks.1", first
    assert "down_blocks.0.attentions.0" in text  # the printed verdict names it too


def test_dropped_text_encoder_lora_fails_naming_the_text_encoder(sd, tmp_path):
    def drop_te(lo):
        pairs = {k: p for k, p in lo.pairs.items() if p.module.component != "text_encoder"}
        return type(lo)(pairs, lo.layout, lo.layout_note, lo.source_format)

    bad = _faulty(sd, tmp_path, drop_te)
    code, text, report = _compare(sd, tmp_path, "--pt-lora", str(bad))
    assert code == 1, text[-3000:]
    first = report["first_diverging_layer"]
    assert first["component"] == "text_encoder", first
    assert first["sgm"].startswith("cond_stage_model.transformer.transformer_layer.resblocks."), first


@pytest.mark.parametrize("preset, heads", [("sd15", {320: 8, 640: 8, 1280: 8}), ("sd21", {320: 5, 640: 10, 1280: 20})])
def test_real_size_layouts_build_with_the_full_weight_names(preset, heads):
    """At real size (no initializer runs, nothing allocated): every port parameter is one the full-weight map fills
    from a diffusers folder, in the key map's shape, and the heads are LDM's (SD 1.5 ``num_heads: 8`` at every
    level; SD 2.1 ``num_head_channels: 64``)."""
    from lora_parity.backends.port.model import build_sdxl
    from lora_parity.backends.port.unet import CrossAttention
    from lora_parity.convert.fullweights import param_maps
    from lora_parity.convert.keymap import keymap_for
    from lora_parity.convert.layout import PRESETS

    from mindspore.nn.utils import no_init_parameters

    layout = PRESETS[preset]
    # without it MindSpore fills every parameter at construction: 4.5-5 GB each, measured in an xdist worker
    # whose malloc recycles freed memory (calloc then writes its zeros)
    with no_init_parameters():
        comps = build_sdxl(layout, vae_config=None, configure_runtime=False)
    shapes = comps.param_shapes()
    assert set(shapes) == {m.sgm for m in param_maps(layout)}
    for e in keymap_for(layout).entries:
        name = f"{e.sgm}.gamma" if e.kind == "norm" else f"{e.sgm}.weight"
        assert shapes[name] == e.weight_shape(), name
    seen = {c.to_q.in_features: c.heads for _, c in comps.unet.cells_and_names() if isinstance(c, CrossAttention)}
    assert seen == heads
