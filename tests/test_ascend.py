"""The `ascend` layer: parity (and images) on real checkpoints with MindSpore on the Ascend NPU.

``pytest -m ascend --lora-ckpt PATH --sdxl-base DIR``.  Without an NPU every test here is
skipped with the reason; ``--ms-device CPU`` runs the very same tests on CPU, and without
``--sdxl-base`` they use the built-in tiny SDXL with a generated LoRA (which is how the
suite itself exercises this layer on every CI run: tests/test_ascend_layer_runs.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora_parity.compare import CompareOptions, run_compare
from lora_parity.parity import assert_report

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
def bases(request, tmp_path_factory, ms_device):
    """(pipeline folder, MindSpore base .ckpt, MindONE LoRA .ckpt) — real ones when given."""
    from lora_parity import ckpt_io
    from lora_parity.fixtures.bundle import sgm_weights_from_pipeline, write_fixture
    from lora_parity.layout import layout_from_pipeline_dir
    from lora_parity.synthetic import make_lora, write_ms_lora
    from lora_parity.tensor import Tensor

    root = tmp_path_factory.mktemp("ascend")
    sdxl, lora = request.config.getoption("--sdxl-base"), request.config.getoption("--lora-ckpt")
    if sdxl is None:
        if lora is not None:
            pytest.skip("--lora-ckpt needs --sdxl-base DIR (the base model it was trained on) for this layer")
        fx = write_fixture(root / "tiny")
        return fx.pt_base, fx.ms_base, fx.ms_lora
    pt_base = Path(sdxl)
    ms_base = pt_base / "ms_base.ckpt"
    if not ms_base.is_file():  # a diffusers folder only: convert the MindSpore weights on the fly
        ms_base = root / "ms_base.ckpt"
        ckpt_io.write_ckpt(ms_base, {k: Tensor.from_numpy(np.ascontiguousarray(v, np.float32))
                                     for k, v in sgm_weights_from_pipeline(pt_base).items()})
    if lora is None:
        ms_lora = write_ms_lora(root / "generated_lora.ckpt", make_lora(layout_from_pipeline_dir(pt_base), rank=4))
    else:
        ms_lora = Path(lora)
    return pt_base, ms_base, ms_lora


def _tolerances(config) -> dict:
    return {"F32": config.getoption("--tol-f32"), "F16": config.getoption("--tol-f16"),
            "BF16": config.getoption("--tol-bf16")}


def test_layer_parity_on_device(bases, ms_device, request, record_property, tmp_path):
    pt_base, ms_base, ms_lora = bases
    report = run_compare(CompareOptions(pt_base=pt_base, ms_base=ms_base, ms_lora=ms_lora, ms_device=ms_device,
                                        tol_overrides=_tolerances(request.config), report_dir=tmp_path))
    for key, value in report.meta["mindspore_settings"].items():
        record_property(f"mindspore.{key}", value)
    record_property("tolerance_rel", report.meta["tolerance"]["rel"])
    record_property("report_json", str(tmp_path / "report.json"))
    assert_report(report, record_property)


ASCEND_STEPS = 4
ASCEND_GUIDANCE = 5.0


def test_image_parity_on_device(bases, ms_device, request, record_property, tmp_path):
    from lora_parity.tolerances import IMAGE_MAE_MAX

    pt_base, ms_base, ms_lora = bases
    mae = request.config.getoption("--image-mae")
    report = run_compare(CompareOptions(pt_base=pt_base, ms_base=ms_base, ms_lora=ms_lora, ms_device=ms_device,
                                        steps=ASCEND_STEPS, guidance=ASCEND_GUIDANCE, image_mae=mae,
                                        tol_overrides=_tolerances(request.config), report_dir=tmp_path))
    im = report.image
    for key in ("mae", "psnr", "ssim", "max_error", "mae_threshold"):
        record_property(f"image_{key}", im[key])
    record_property("seconds_per_step", im["seconds_per_step"])
    assert im["mae_threshold"] == (IMAGE_MAE_MAX if mae is None else mae)
    assert im["passed"], f"image MAE {im['mae']:.3f} >= {im['mae_threshold']}; images and heatmap in {tmp_path}"
