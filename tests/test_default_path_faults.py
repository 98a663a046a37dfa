"""Faults in the converter on the real default path: a plain ``compare --ms-lora X.ckpt`` converts
the MindONE LoRA itself (no ``--pt-lora``), so a bug in the key map or a writer must make *that*
run fail and name the layer where the bug lives.  The faults are planted in this process (the
one that converts); the MindSpore side's capture of a clean run is reused.  Alpha != rank
throughout: rank 4 at alpha 2 (scale 0.5) and alpha 8 (scale 2)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_parity.compare import CompareOptions, run_compare
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.parity.metrics import ParityReport, assert_report
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

from . import faults
from .helpers import run_cli

pytestmark = pytest.mark.parity

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."
RANK, ALPHA_HALF = 4, 2.0  # scale 0.5; the fixture's own LoRA is rank 4, alpha 8 (scale 2)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    pytest.importorskip("mindspore")
    from lora_parity.fixtures.bundle import FIXTURE_LORA_ALPHA, FIXTURE_LORA_RANK, write_fixture

    assert FIXTURE_LORA_ALPHA / FIXTURE_LORA_RANK == 2.0
    return write_fixture(tmp_path_factory.mktemp("default_path") / "fx")


@pytest.fixture(scope="module")
def layout(fx):
    return layout_from_pipeline_dir(fx.pt_base)


def _opts(fx, lora: Path, alpha: float, **kw) -> CompareOptions:
    return CompareOptions(pt_base=fx.pt_base, ms_base=fx.ms_base, latents=fx.latents, ms_lora=lora, alpha=alpha,
                          **kw)


@pytest.fixture(scope="module")
def half(fx, layout, tmp_path_factory):
    """A LoRA at scale 0.5 and its clean run (layers + 2-step image), captures kept for the faults."""
    tmp = tmp_path_factory.mktemp("half")
    lora = write_ms_lora(tmp / "half.ckpt", make_lora(layout, rank=RANK, alpha=ALPHA_HALF, modules="linear", seed=7,
                                                      b_std=0.1))
    keep = tmp / "captures"
    report = run_compare(_opts(fx, lora, ALPHA_HALF, steps=2, keep_captures=keep))
    return lora, keep, report


def _faulty(fx, half, **kw) -> ParityReport:
    lora, keep, _ = half
    return run_compare(_opts(fx, lora, ALPHA_HALF, reuse_captures={"ms": keep / "ms"}, **kw))


def _fails_at(report, sgm: str) -> None:
    assert not report.passed
    assert report.first_failure is not None, report.image
    assert report.first_failure.sgm == sgm, report.first_failure.message()


# ---------------------------------------------------------------- clean runs at scale 0.5 and 2

def test_scale_half_layers_and_image_agree(half, record_property):
    _, _, report = half
    assert_report(report, record_property)
    assert report.image is not None and report.image["passed"], report.image


def test_scale_two_layers_and_image_agree(fx, record_property):
    report = run_compare(_opts(fx, fx.ms_lora, 8.0, steps=2))
    assert_report(report, record_property)
    assert report.image is not None and report.image["passed"], report.image


# ---------------------------------------------------------------- faults in the converter

def test_keymap_entry_swapped(fx, half, layout, monkeypatch):
    """(a) The key map sends output_blocks.1's attn1 to_q LoRA to to_k and back."""
    q = UNET + "output_blocks.1.1.transformer_blocks.0.attn1.to_q"
    faults.plant_keymap_swap(monkeypatch, layout, q, q[:-1] + "k")
    _fails_at(_faulty(fx, half), UNET + "output_blocks.1")


def test_wrong_alpha_in_peft_metadata(fx, half, monkeypatch):
    """(b) The PEFT writer's ``lora_adapter_metadata`` says text_encoder_2.lora_alpha = r (scale 1, not 0.5)."""
    faults.plant_peft_alpha(monkeypatch, lambda r, a: r, ["text_encoder_2"])
    _fails_at(_faulty(fx, half), TE2 + "transformer.resblocks.0")


def test_text_encoder_2_pairs_dropped(fx, half, monkeypatch):
    """(c) The writer leaves out every text_encoder_2 key (diffusers then loads the rest without complaint)."""
    faults.plant_writer_drop(monkeypatch, lambda k: k.startswith("text_encoder_2."))
    _fails_at(_faulty(fx, half), TE2 + "transformer.resblocks.0")


def test_transposed_update_of_a_square_module(fx, half, monkeypatch):
    """(d) For a square module (32 -> 32) the writer stores lora_A := B^T, lora_B := A^T: the shapes
    fit exactly and only the values (the update transposed) are wrong."""
    faults.plant_transposed_update(monkeypatch, TE1 + "encoder.layers.1.self_attn.v_proj")
    _fails_at(_faulty(fx, half), TE1 + "encoder.layers.1")


def test_kohya_conversion_agrees_and_a_swapped_kohya_name_is_caught(fx, half, layout, monkeypatch):
    """(e) ``compare --pt-format kohya`` (diffusers loads the ComfyUI/A1111 file) agrees; then the kohya
    writer swaps two same-shaped names (attn2 to_k / to_v of input_blocks.3) and the block fails."""
    clean = _faulty(fx, half, pt_format="kohya")
    assert clean.passed, clean.table()
    k = UNET + "input_blocks.3.1.transformer_blocks.1.attn2.to_k"
    faults.plant_kohya_name_swap(monkeypatch, layout, k, k[:-1] + "v")
    _fails_at(_faulty(fx, half, pt_format="kohya"), UNET + "input_blocks.3")


def test_cli_exits_1_on_a_converter_fault(fx, half, monkeypatch, tmp_path):
    lora, _, _ = half
    faults.plant_writer_drop(monkeypatch, lambda k: k.startswith("text_encoder_2."))
    code, out, err = run_cli(["compare", "--pt-base", str(fx.pt_base), "--ms-base", str(fx.ms_base),
                              "--latents", str(fx.latents), "--ms-lora", str(lora), "--alpha", str(ALPHA_HALF),
                              "--report", str(tmp_path / "rep"), "--quiet"])
    assert code == 1, out + err
    assert "first diverging layer" in out and TE2 + "transformer.resblocks.0" in out, out
