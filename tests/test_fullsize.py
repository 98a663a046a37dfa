"""The ``fullsize`` layer: SDXL base and refiner at their real architecture, through ``compare``.

Random weights (``random:sdxl-base`` / ``random:sdxl-refiner``, generated once into the
cache), a LoRA on all 560 UNet attention modules plus the text encoders' attention, alpha
different from the rank, a 256x256 image (32x32 latents) on CPU: per-layer parity at one
timestep, then a 2-step image with guidance.  Each side runs in its own child process, as
``compare`` does by default.  The fault tests plant faults that only exist at real size on
that same default path and reuse the kept capture of the side the fault does not touch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataclasses import replace

from lora_parity.compare import CompareOptions, run_compare
from lora_parity.convert import ckpt_io
from lora_parity.parity.align import unet_alignment
from lora_parity.convert.layout import PRESETS
from lora_parity.parity.metrics import ParityReport, assert_report
from lora_parity.parity.tolerances import LAYER_ACTIVITY_MIN

from . import faults

pytestmark = pytest.mark.fullsize

# the CPU targets: 256x256 (32x32 latents), a 2-step image with guidance, rank 4 at alpha 8 (scale 2)
FULLSIZE_IMAGE_SIZE = 256
FULLSIZE_STEPS = 2
FULLSIZE_ALPHA = 8.0

INPUT_8 = "model.diffusion_model.input_blocks.8"
QK_BLOCK = f"{INPUT_8}.1.transformer_blocks.9.attn1"
MIDDLE = "model.diffusion_model.middle_block"


@dataclass
class Run:
    report: ParityReport
    lora: Path
    captures: Path
    options: CompareOptions


def _full_run(tmp: Path, preset: str, cache) -> Run:
    lora = tmp / f"{preset}_lora.ckpt"
    faults.write_fullsize_lora(PRESETS[preset], lora, alpha=FULLSIZE_ALPHA)
    o = CompareOptions(base=f"random:{preset}", cache=cache, ms_lora=lora, alpha=FULLSIZE_ALPHA,
                       height=FULLSIZE_IMAGE_SIZE, width=FULLSIZE_IMAGE_SIZE, steps=FULLSIZE_STEPS,
                       report_dir=tmp / "report", keep_captures=tmp / "captures")
    return Run(run_compare(o), lora, tmp / "captures", o)


@pytest.fixture(scope="module")
def cache(request):
    return request.config.getoption("--fullsize-cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> Run:
    return _full_run(tmp_path_factory.mktemp("sdxl_base"), "sdxl-base", cache)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory, cache) -> Run:
    return _full_run(tmp_path_factory.mktemp("sdxl_refiner"), "sdxl-refiner", cache)


def _record(run: Run, record_property, name: str) -> None:
    meta = run.report.meta
    for side, peak in meta["peak_rss_bytes"].items():
        record_property(f"{name}_peak_rss_gb[{side}]", round(peak / 2**30, 2))
    for side, secs in meta["seconds"].items():
        record_property(f"{name}_seconds[{side}]", round(secs["total"], 1))
    record_property(f"{name}_image_mae", run.report.image["mae"])


def _assert_phases_freed(report: ParityReport) -> None:
    """One component at a time: after the UNet phase its weights are gone on both sides."""
    for side in ("pytorch", "mindspore"):
        after = report.meta["rss_after_bytes"][side]
        assert after["unet"] < report.meta["peak_rss_bytes"][side] / 2, (side, after)


def _assert_judged_twice(report: ParityReport) -> None:
    """Every component by its chained and its local (replayed) error; the LoRA's effect on every block it targets."""
    kinds = {(m.component, m.kind) for m in report.layers}
    for comp in {m.component for m in report.layers}:
        assert {(comp, "chained"), (comp, "local")} <= kinds, comp
    assert ("unet", "effect") in kinds and ("text_encoder_2", "effect") in kinds


def _assert_alive(report: ParityReport) -> None:
    """Random weights at full depth must keep every activation finite and non-trivial."""
    dead = [m.sgm for m in report.layers if m.kind != "effect"
            and (not math.isfinite(m.ref_max) or m.ref_max < LAYER_ACTIVITY_MIN)]
    assert not dead, f"activations vanish or blow up at full size: {dead[:5]}"


def _fault_options(run: Run, keep_side: str, **kw) -> CompareOptions:
    """The run's options without the image, reusing the kept capture of the untouched side."""
    o = run.options
    return CompareOptions(base=o.base, cache=o.cache, ms_lora=o.ms_lora, alpha=o.alpha, height=o.height,
                          width=o.width, reuse_captures={keep_side: run.captures / keep_side}, **kw)


def test_sdxl_base_fullsize_parity(base, record_property):
    report = base.report
    unet_layers = {m.sgm for m in report.layers if m.component == "unet"}
    assert unet_layers == {a.sgm for a in unet_alignment(PRESETS["sdxl-base"])}  # every SDXL-base block
    assert {m.component for m in report.layers} == {"text_encoder", "text_encoder_2", "conditioning", "unet", "vae"}
    _assert_judged_twice(report)
    _assert_alive(report)
    _assert_phases_freed(report)
    assert_report(report, record_property)
    assert report.image["passed"], report.image["title"]
    assert report.meta["isolated_processes"]
    _record(base, record_property, "base")


def test_sdxl_refiner_fullsize_parity_with_aesthetic_score(refiner, record_property):
    report = refiner.report
    assert report.meta["refiner"]
    assert {m.component for m in report.layers} == {"text_encoder_2", "conditioning", "unet", "vae"}
    _assert_judged_twice(report)
    y = next(m for m in report.layers if m.sgm == "conditioner.vector")
    assert y.shape[-1] == PRESETS["sdxl-refiner"].unet.adm_in_channels  # 2560: pooled + 5 sinusoids
    _assert_alive(report)
    _assert_phases_freed(report)
    assert_report(report, record_property)
    assert report.image["passed"], report.image["title"]
    _record(refiner, record_property, "refiner")


def test_two_faults_in_the_base_are_each_caught_and_named_in_their_own_block(base, tmp_path, monkeypatch):
    """Two faults that only exist at real size, planted at once on compare's default path, one MindSpore run:

    * the MindONE file's to_q/to_k LoRA of ``input_blocks.8.1.transformer_blocks.9`` swapped (a block the tiny
      model does not have): a 4e-5 change at input_blocks.8, below the UNet's chained row (MindONE's numerics put
      MindSpore's float32 exp into the timestep sinusoid), caught by that block's local (replayed) error;
    * the port's middle block running 9 of its 10 transformer blocks (planted inside compare's side child).

    Each is named in its own block: the first failure is input_blocks.8's local row, and the local rows that fail
    are exactly those two blocks -- replay gives every block the reference's inputs, so the upstream swap neither
    hides the truncation nor spreads into the blocks between them.  (One run for both: at real size a MindSpore
    side is ~115 s of one core; the PyTorch side's clean capture is reused.)"""
    sd = dict(ckpt_io.read_ckpt(base.lora))
    for half in ("lora_A", "lora_B"):
        q, k = f"{QK_BLOCK}.to_q.{half}.weight", f"{QK_BLOCK}.to_k.{half}.weight"
        sd[q], sd[k] = sd[k], sd[q]
    swapped = tmp_path / "swapped_lora.ckpt"
    ckpt_io.write_ckpt(swapped, sd)
    faults.plant_child_fault(monkeypatch, "truncate_middle")
    report = run_compare(replace(_fault_options(base, "pt"), ms_lora=swapped))
    assert not report.passed
    first = report.first_failure
    assert (first.sgm, first.kind) == (INPUT_8, "local"), first.message()
    local = [m.sgm for m in report.layers if m.kind == "local" and not m.passed]
    assert local == [INPUT_8, MIDDLE], local


def test_port_fault_at_real_size_is_caught_in_the_refiner(refiner, monkeypatch):
    """The refiner's aesthetic score lost in the MindSpore port (taken as 0), planted inside compare's side
    child; the PyTorch capture is reused."""
    faults.plant_child_fault(monkeypatch, "drop_aesthetic")
    report = run_compare(_fault_options(refiner, "pt"))
    assert not report.passed
    assert report.first_failure.sgm == "conditioner.vector", report.first_failure.message()
