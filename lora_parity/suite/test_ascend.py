"""The `ascend` layer: parity (and images) on real checkpoints with MindSpore on the Ascend NPU.

``pytest -m ascend --lora-ckpt PATH --sdxl-base SPEC`` in the repository, or
``pytest --pyargs lora_parity -m ascend --lora-ckpt PATH --sdxl-base SPEC`` where the package is
installed (this file ships in ``lora_parity/suite``).  Without an NPU every test here is
skipped with the reason; ``--ms-device CPU`` runs the very same tests on CPU, and without
``--sdxl-base`` they use the built-in tiny SDXL with a generated LoRA (which is how the
suite itself exercises this layer on every CI run: tests/test_ascend_layer_runs.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_parity.compare import CompareOptions, run_compare
from lora_parity.parity.metrics import assert_report

pytestmark = pytest.mark.ascend


@pytest.fixture(scope="module")
def ms_device(request) -> str:
    device = request.config.getoption("--ms-device") or "Ascend"
    if device == "Ascend":
        from lora_parity.device import ascend_present

        ok, why = ascend_present()
        if not ok:
            pytest.skip(why)
    pytest.importorskip("mindspore")
    return device


@pytest.fixture(scope="module")
def bases(request, tmp_path_factory, ms_device) -> dict:
    """CompareOptions for the base and LoRA: ``--sdxl-base SPEC`` (a diffusers folder, an official
    single-file checkpoint or ``random:sdxl-base``; both sides built from it) with ``--lora-ckpt``
    (or a generated LoRA), else the built-in tiny SDXL with its LoRA."""
    from lora_parity.fixtures.bundle import write_fixture
    from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

    root = tmp_path_factory.mktemp("ascend")
    spec, lora = request.config.getoption("--sdxl-base"), request.config.getoption("--lora-ckpt")
    if spec is None:
        if lora is not None:
            pytest.skip("--lora-ckpt needs --sdxl-base SPEC (the base model it was trained on) for this layer")
        fx = write_fixture(root / "tiny")
        return {"pt_base": fx.pt_base, "ms_base": fx.ms_base, "ms_lora": fx.ms_lora}
    if lora is None:
        from lora_parity.bases import resolve_base
        from lora_parity.convert.layout import layout_from_pipeline_dir

        layout = layout_from_pipeline_dir(resolve_base(spec).pipeline_dir)
        lora = write_ms_lora(root / "generated_lora.ckpt", make_lora(layout, rank=4))
    return {"base": spec, "ms_lora": Path(lora)}


def _tolerances(config) -> dict:
    return {"F32": config.getoption("--tol-f32"), "F16": config.getoption("--tol-f16"),
            "BF16": config.getoption("--tol-bf16")}


def test_layer_parity_on_device(bases, ms_device, request, record_property, tmp_path):
    report = run_compare(CompareOptions(**bases, ms_device=ms_device, tol_overrides=_tolerances(request.config), report_dir=tmp_path))
    for key, value in report.meta["mindspore_settings"].items():
        record_property(f"mindspore.{key}", value)
    record_property("tolerance_rel", report.meta["tolerance"]["rel"])
    record_property("report_json", str(tmp_path / "report.json"))
    assert_report(report, record_property)


ASCEND_STEPS = 4
ASCEND_GUIDANCE = 5.0


def test_image_parity_on_device(bases, ms_device, request, record_property, tmp_path):
    from lora_parity.parity.tolerances import image_gate

    mae = request.config.getoption("--image-mae")
    report = run_compare(CompareOptions(**bases, ms_device=ms_device, steps=ASCEND_STEPS, guidance=ASCEND_GUIDANCE, image_mae=mae,
                                        tol_overrides=_tolerances(request.config), report_dir=tmp_path))
    im = report.image
    for key in ("mae", "psnr", "ssim", "max_error", "mae_threshold"):
        record_property(f"image_{key}", im[key])
    record_property("seconds_per_step", im["seconds_per_step"])
    assert im["mae_threshold"] == image_gate("F32", ms_device=ms_device, mae=mae)["mae"]
    assert im["passed"], f"image MAE {im['mae']:.3f} >= {im['mae_threshold']}; images and heatmap in {tmp_path}"
