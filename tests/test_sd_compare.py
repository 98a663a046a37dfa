"""SD 1.x / 2.x through ``compare``: mindone.diffusers against diffusers, as for SDXL (issue 15).

The LoRA is what mindone.diffusers' own SD trainer saves (``add_adapter`` on the UNet and the text encoder,
``get_peft_model_state_dict`` -> ``StableDiffusionPipeline.save_lora_weights``, run in the mindone environment),
the bases are generated (``random:tiny-sd1`` / ``random:tiny-sd2``: Euler, v-prediction for 2.x).  A clean run
passes (layers chained and replayed, the LoRA's effect, a 2-step image); realistic faults on the PyTorch side
(q/k swapped in one UNet block, the text encoder's LoRA dropped, a wrong scale) fail with exit 1 naming the
block that holds them; the port (MindONE's LDM model) runs the same LoRA written as MindONE's LDM ``.ckpt``.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lora_parity.convert import formats
from lora_parity.convert.converter import load_lora
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.convert.safetensors_io import write_safetensors

from . import faults
from .helpers import run_cli

pytestmark = pytest.mark.parity
SCRIPT = Path(__file__).parent / "mindone_scripts" / "save_trained_lora.py"
FAMILIES = ("tiny-sd1", "tiny-sd2")


@pytest.fixture(scope="module")
def mindone_python():
    from lora_parity.backends import get_backend

    be = get_backend("mindone")
    ok, why = be.is_available()
    if not ok:
        pytest.skip(f"mindone backend: {why}")
    return be.interpreter()


@pytest.fixture(scope="module", params=FAMILIES)
def sd(request, tmp_path_factory, mindone_python):
    """(base spec, cache, pipeline folder, the LoRA mindone's trainer code saved)."""
    from lora_parity.bases import resolve_base

    root = tmp_path_factory.mktemp(request.param)
    spec, cache = f"random:{request.param}", root / "cache"
    base = resolve_base(spec, cache=cache)
    proc = subprocess.run([mindone_python, str(SCRIPT), str(base.pipeline_dir), str(root / "lora"), "4",
                           base.variant or ""], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return spec, cache, base.pipeline_dir, root / "lora" / "pytorch_lora_weights.safetensors"


def _compare(sd, tmp_path, *extra):
    spec, cache, _, lora = sd
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", "--ms-backend", "mindone", "--base", spec, "--cache", str(cache),
                              "--ms-lora", str(lora), "--report", str(report), "--quiet", *extra])
    data = json.loads((report / "report.json").read_text()) if (report / "report.json").is_file() else None
    return code, out + err, data


def _faulty(sd, tmp_path, fault) -> Path:
    _, _, pipe_dir, lora = sd
    good = load_lora(lora, layout=layout_from_pipeline_dir(pipe_dir))
    out = tmp_path / "pt_side.safetensors"
    write_safetensors(out, *formats.tensors_for(fault(good), "peft"))
    return out


def test_mindone_trained_lora_passes_on_sd(sd, tmp_path):
    code, text, report = _compare(sd, tmp_path, "--steps", "2")
    assert code == 0, text[-3000:]
    layers = report["layers"]
    effects = [r for r in layers if r["kind"] == "effect" and r["effect_size"]]
    assert any(r["component"] == "text_encoder" for r in effects) and any(r["component"] == "unet" for r in effects)
    assert report["image"]["passed"] and report["meta"]["refiner"] is False


def test_qk_swap_in_one_unet_block_fails_naming_it(sd, tmp_path):
    block = "input_blocks.1"  # the first down block's attention (diffusers: down_blocks.0.attentions.0)
    bad = _faulty(sd, tmp_path, lambda lo: faults.swap_projections(lo, block))
    code, text, report = _compare(sd, tmp_path, "--pt-lora", str(bad))
    assert code == 1, text[-3000:]
    first = report["first_diverging_layer"]
    assert first["diffusers"] == "unet.down_blocks.0.attentions.0", first
    assert "down_blocks.0.attentions.0" in text  # the printed verdict names it too


def test_dropped_text_encoder_lora_fails_naming_the_text_encoder(sd, tmp_path):
    def drop_te(lo):
        pairs = {k: p for k, p in lo.pairs.items() if p.module.component != "text_encoder"}
        return type(lo)(pairs, lo.layout, lo.layout_note, lo.source_format)

    bad = _faulty(sd, tmp_path, drop_te)
    code, text, report = _compare(sd, tmp_path, "--pt-lora", str(bad))
    assert code == 1, text[-3000:]
    assert report["first_diverging_layer"]["component"] == "text_encoder", report["first_diverging_layer"]


def test_wrong_scale_fails(sd, tmp_path):
    bad = _faulty(sd, tmp_path, lambda lo: faults.wrong_scale(lo, 1.01))
    code, text, report = _compare(sd, tmp_path, "--pt-lora", str(bad))
    assert code == 1, text[-3000:]
    assert report["first_diverging_layer"]["component"] == "text_encoder", report["first_diverging_layer"]


def test_the_port_runs_an_sd_base_on_the_ldm_ckpt(sd, tmp_path):
    """The port (the default backend) runs MindONE's LDM SD 1.x / 2.x model: the UNet LoRA mindone's trainer
    saved, written as MindONE's LDM ``.ckpt`` by the converter (lora_down / lora_up, ``lora_rank``), passes
    against diffusers.  Its text-encoder q/k/v LoRAs are left out: fused into MindONE's one ``in_proj`` they
    are rank 12 beside rank 4, which MindONE's one ``lora_rank`` cannot load (the converter refuses that);
    the text-encoder path on the port is in ``tests/test_port_sd.py``."""
    spec, cache, pipe_dir, lora = sd
    trained = load_lora(lora, layout=layout_from_pipeline_dir(pipe_dir))
    unet_only = type(trained)({k: p for k, p in trained.pairs.items() if p.module.component == "unet"},
                              trained.layout, trained.layout_note, trained.source_format)
    ckpt = tmp_path / "as_mindone_ldm.ckpt"
    formats.write(ckpt, unet_only, "ms")
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", "--base", spec, "--cache", str(cache), "--ms-lora", str(ckpt),
                              "--report", str(report), "--quiet"])
    assert code == 0, (out + err)[-3000:]
    data = json.loads((report / "report.json").read_text())
    assert data["meta"]["backend"] == "port"
    assert any(r["kind"] == "effect" and r["component"] == "unet" and r["effect_size"] for r in data["layers"])


@pytest.mark.parametrize("pt_format", ["peft", "kohya"])
def test_mindone_ldm_ckpt_compares_through_its_conversion(sd, tmp_path, pt_format):
    """MindONE's older SD LoRA (.ckpt, lora_down / lora_up, run with --lora_scale 0.5): compare converts it for
    each side (PEFT for mindone, PEFT or kohya for diffusers) with --lora-scale, and the run passes."""
    from lora_parity.fixtures.synthetic import make_lora

    from .test_families import ldm_module_names, write_mindone_ldm_lora

    spec, cache, pipe_dir, _ = sd
    layout = layout_from_pipeline_dir(pipe_dir)
    ckpt = write_mindone_ldm_lora(tmp_path / "mindone_sd_lora.ckpt",
                                  make_lora(layout, rank=4, modules=ldm_module_names(layout), seed=12))
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", "--ms-backend", "mindone", "--base", spec, "--cache", str(cache),
                              "--ms-lora", str(ckpt), "--lora-scale", "0.5", "--pt-format", pt_format,
                              "--report", str(report), "--quiet"])
    assert code == 0, (out + err)[-3000:]
    layers = json.loads((report / "report.json").read_text())["layers"]
    assert any(r["kind"] == "effect" and r["component"] == "text_encoder" and r["effect_size"] for r in layers)


def test_bundles_captured_apart_are_judged_alike(sd, tmp_path):
    """capture on two machines (diffusers; mindone replaying on the diffusers bundle), judge the pair."""
    spec, cache, _, lora = sd
    common = ["--base", spec, "--cache", str(cache), "--lora", str(lora), "--steps", "2", "--quiet"]
    code, out, err = run_cli(["capture", "--backend", "diffusers", *common, "-o", str(tmp_path / "pt")])
    assert code == 0, (out + err)[-3000:]
    code, out, err = run_cli(["capture", "--backend", "mindone", *common, "--replay-from", str(tmp_path / "pt"),
                              "-o", str(tmp_path / "ms")])
    assert code == 0, (out + err)[-3000:]
    code, out, err = run_cli(["compare", "--ms-bundle", str(tmp_path / "ms"), "--pt-bundle", str(tmp_path / "pt"),
                              "--report", str(tmp_path / "report"), "--quiet"])
    assert code == 0, (out + err)[-3000:]
    layers = json.loads((tmp_path / "report" / "report.json").read_text())["layers"]
    assert any(r["kind"] == "local" and r["component"] == "unet" for r in layers)
