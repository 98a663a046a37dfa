"""``compare`` on every kind of base (random, single file, refiner), several timesteps, LoCon,
fp16 images and kept captures, on tiny models; each with a fault that makes it fail."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lora_parity.bases import resolve_base
from lora_parity.bases.single_file import write_single_file
from lora_parity.compare import CompareOptions, run_compare
from lora_parity.errors import LoraParityError
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.parity.metrics import assert_report
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

from . import faults
from .helpers import run_cli

pytestmark = pytest.mark.parity

UNET = "model.diffusion_model."
# alpha != rank everywhere: rank 4 at alpha 2 is scale 0.5 (a lost alpha shows)
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _lora(tmp: Path, pipeline_dir: Path, modules: str = "linear", name: str = "lora.ckpt", **kw) -> Path:
    lora = make_lora(layout_from_pipeline_dir(pipeline_dir), rank=RANK, alpha=ALPHA, modules=modules, seed=5,
                     b_std=0.1, **kw)
    write_ms_lora(tmp / name, lora)
    return tmp / name


@pytest.fixture(scope="module")
def tiny(cache, tmp_path_factory):
    b = resolve_base("random:tiny", cache=cache)
    tmp = tmp_path_factory.mktemp("tiny")
    return b, _lora(tmp, b.pipeline_dir, "all", "locon.ckpt")


@pytest.fixture(scope="module")
def refiner(cache, tmp_path_factory):
    b = resolve_base("random:tiny-refiner", cache=cache)
    tmp = tmp_path_factory.mktemp("refiner")
    lora = _lora(tmp, b.pipeline_dir)
    keep = tmp / "captures"
    report = run_compare(CompareOptions(base="random:tiny-refiner", cache=cache, ms_lora=lora, alpha=ALPHA, steps=2,
                                        keep_captures=keep))
    return b, lora, keep, report


def test_locon_on_every_conv_agrees_through_compare(tiny, cache, record_property):
    """LoRA on conv_in, ResBlock convs, samplers and out (LoCon) runs on the MindSpore side too."""
    _, locon = tiny
    report = run_compare(CompareOptions(base="random:tiny", cache=cache, ms_lora=locon, alpha=ALPHA))
    assert_report(report, record_property)


def test_locon_missing_on_the_pytorch_side_is_caught(tiny, cache, tmp_path):
    """A converter that keeps only Linear LoRAs (as the old tool did): the first conv block fails."""
    b, locon = tiny
    from lora_parity.convert import formats
    from lora_parity.convert.converter import load_lora
    from lora_parity.convert.lora_set import LoraSet
    from lora_parity.convert.safetensors_io import write_safetensors

    lora = load_lora(locon, layout=layout_from_pipeline_dir(b.pipeline_dir), alpha=ALPHA)
    linear_only = LoraSet({k: p for k, p in lora.pairs.items() if p.module.kind == "linear"}, lora.layout,
                          lora.layout_note, lora.source_format)
    pt = tmp_path / "linear_only.safetensors"
    write_safetensors(pt, *formats.tensors_for(linear_only, "peft"))
    report = run_compare(CompareOptions(base="random:tiny", cache=cache, ms_lora=locon, pt_lora=pt, alpha=ALPHA))
    assert not report.passed
    assert report.first_failure.sgm == UNET + "input_blocks.0", report.first_failure.message()


def test_several_timesteps_from_the_command_line(tiny, cache, tmp_path):
    _, locon = tiny
    code, out, err = run_cli(["compare", "--base", "random:tiny", "--cache", str(cache), "--ms-lora", str(locon),
                              "--alpha", str(ALPHA), "--timesteps", "999,500,1", "--report", str(tmp_path / "r"),
                              "--quiet"])
    assert code == 0, out + err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["meta"]["timesteps"] == [999.0, 500.0, 1.0]
    unet = [m["sgm"] for m in report["layers"] if m["component"] == "unet"]
    per_t = {t: [s for s in unet if s.endswith(f"@t{t}")] for t in (999, 500, 1)}
    assert len(per_t[999]) == len(per_t[500]) == len(per_t[1]) == len(unet) // 3 > 0


def test_fp16_images_on_both_sides_judged_against_the_fp32_reference(tiny, cache):
    _, locon = tiny
    report = run_compare(CompareOptions(base="random:tiny", cache=cache, ms_lora=locon, alpha=ALPHA, dtype="F16",
                                        steps=2))
    assert report.passed, report.table()
    assert report.image["dtype"] == "F16" and report.image["reference"] == "pytorch fp32"
    assert "pytorch_low_precision_vs_reference" in report.image
    assert set(report.meta["peak_rss_bytes"]) == {"pytorch", "pytorch_f16", "mindspore"}


def test_official_single_file_layout_builds_both_sides(tiny, cache, tmp_path, record_property):
    b, locon = tiny
    single = write_single_file(b.pipeline_dir, tmp_path / "sd_xl_tiny.safetensors", variant=b.variant)
    report = run_compare(CompareOptions(base=str(single), cache=cache, ms_lora=locon, alpha=ALPHA))
    assert resolve_base(str(single), cache=cache).kind == "single-file"
    assert_report(report, record_property)


def test_refiner_with_aesthetic_score_agrees_layers_and_image(refiner, record_property):
    _, _, _, report = refiner
    assert report.meta["refiner"]
    assert "text_encoder" not in {m.component for m in report.layers}
    assert_report(report, record_property)
    assert report.image["passed"], report.image["title"]


@pytest.mark.parametrize("fault, layer", [("drop_aesthetic", "conditioner.vector"),
                                          ("truncate_middle", UNET + "middle_block")])
def test_port_fault_in_the_side_child_is_caught(refiner, cache, monkeypatch, fault, layer):
    """The child-process faults the fullsize layer uses, on the tiny refiner (aesthetic score dropped;
    the middle block's transformer stack (depth 2) run one block short)."""
    _, lora, keep, _ = refiner
    faults.plant_child_fault(monkeypatch, fault)
    report = run_compare(CompareOptions(base="random:tiny-refiner", cache=cache, ms_lora=lora, alpha=ALPHA,
                                        reuse_captures={"pt": keep / "pt"}))
    assert not report.passed
    assert report.first_failure.sgm == layer, report.first_failure.message()


def test_keymap_swap_planted_in_the_converter_is_caught(refiner, cache, monkeypatch):
    """A q/k swap in the key map (the converter's data) fails a plain compare of the MindONE .ckpt."""
    b, lora, keep, _ = refiner
    layout = layout_from_pipeline_dir(b.pipeline_dir)
    attn = next(e.sgm for e in faults.keymap_entries(layout) if e.sgm.endswith("attn1.to_q"))
    faults.plant_keymap_swap(monkeypatch, layout, attn, attn[:-1] + "k")
    report = run_compare(CompareOptions(base="random:tiny-refiner", cache=cache, ms_lora=lora, alpha=ALPHA,
                                        reuse_captures={"ms": keep / "ms"}))
    assert not report.passed
    assert attn.startswith(report.first_failure.sgm), report.first_failure.message()


def test_kept_capture_from_other_inputs_is_refused(refiner, cache):
    _, lora, keep, _ = refiner
    with pytest.raises(LoraParityError, match="other inputs.*prompt"):
        run_compare(CompareOptions(base="random:tiny-refiner", cache=cache, ms_lora=lora, alpha=ALPHA,
                                   prompt="something else", reuse_captures={"pt": keep / "pt"}))


def test_base_and_pair_together_is_a_usage_error(tiny, cache, tmp_path):
    b, _ = tiny
    code, _, err = run_cli(["compare", "--base", "random:tiny", "--pt-base", str(b.pipeline_dir), "--ms-base", "x.ckpt"])
    assert code == 2 and "not both" in err and "Traceback" not in err


def test_height_width_give_the_latent_size(tiny, cache):
    b, _ = tiny
    from lora_parity.compare import compare_latents, resolve_bases

    o = CompareOptions(base="random:tiny", cache=cache, height=64, width=48)
    latents = compare_latents(o, resolve_bases(o))
    assert latents.shape == (1, 4, 32, 24) and latents.dtype == np.float32
    with pytest.raises(LoraParityError, match="multiples"):
        compare_latents(CompareOptions(base="random:tiny", cache=cache, height=30), resolve_bases(o))


@pytest.mark.image
def test_infer_takes_a_base_spec_and_both_backends_agree(refiner, cache, tmp_path):
    """``infer --base random:tiny-refiner`` on each backend (the refiner's img2img path, aesthetic score)."""
    from PIL import Image

    from lora_parity.sampling import image_mae
    from lora_parity.parity.tolerances import IMAGE_MAE_FP32_TARGET

    _, lora, _, _ = refiner
    pngs = []
    for backend in ("ms", "pt"):
        out = tmp_path / f"{backend}.png"
        code, _, err = run_cli(["infer", "--backend", backend, "--base", "random:tiny-refiner", "--cache", str(cache),
                                "--ms-lora", str(lora), "--steps", "2", "-o", str(out), "--quiet"])
        assert code == 0, err
        pngs.append(np.asarray(Image.open(out).convert("RGB")))
    assert image_mae(*pngs) < IMAGE_MAE_FP32_TARGET
