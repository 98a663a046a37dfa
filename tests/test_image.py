"""The image layer through `compare --steps`: images agree, artifacts are kept, a fault is caught."""
from __future__ import annotations

import pytest

from lora_parity.convert import formats
from lora_parity.compare import CompareOptions, run_compare
from lora_parity.convert.converter import load_lora
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.convert.safetensors_io import write_safetensors
from lora_parity.parity.tolerances import IMAGE_MAE_FP32_TARGET

from . import faults

pytestmark = pytest.mark.image

STEPS = 3
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    pytest.importorskip("mindspore")
    from lora_parity.fixtures.bundle import write_fixture

    return write_fixture(tmp_path_factory.mktemp("image") / "fx")


@pytest.fixture
def gates(request) -> dict:
    """--tol-*/--mismatch-*/--image-mae/--image-max-error as CompareOptions fields (None: the table's)."""
    from conftest import gate_overrides

    return gate_overrides(request.config)


def _run(fx, tmp_path, gates, **kw):
    return run_compare(CompareOptions(pt_base=fx.pt_base, ms_base=fx.ms_base, ms_lora=fx.ms_lora, latents=fx.latents,
                                      steps=STEPS, guidance=GUIDANCE, report_dir=tmp_path, **gates, **kw))


def test_compare_images_agree_with_lora(fx, ms_backend, tmp_path, gates, record_property):
    report = _run(fx, tmp_path, gates, ms_backend=ms_backend)
    im = report.image
    for key in ("mae", "psnr", "ssim", "max_error"):
        record_property(f"image_{key}", im[key])
    record_property("image_mae_threshold", im["mae_threshold"])
    record_property("image_gate", im["gate"])
    mae_max = im["mae_threshold"]
    record_property("seconds_per_step", im["seconds_per_step"])
    saved = f"images and heatmap saved in {tmp_path}"
    assert im["mae"] < mae_max, saved
    assert im["mae"] < IMAGE_MAE_FP32_TARGET, saved
    assert report.passed, saved
    for name in ("ms.png", "pt.png", "side_by_side.png", "diff_heatmap.png", "layer_errors.png", "report.json"):
        assert (tmp_path / name).is_file(), name


def test_image_check_fails_on_a_wrong_scale(fx, ms_backend, tmp_path, gates):
    lora = load_lora(fx.ms_lora, layout=layout_from_pipeline_dir(fx.pt_base))
    bad = tmp_path / "wrong_scale.safetensors"
    write_safetensors(bad, *formats.tensors_for(faults.wrong_scale(lora), "peft"))
    report = _run(fx, tmp_path / "report", gates, pt_lora=bad, ms_backend=ms_backend)
    assert report.image["mae"] > report.image["mae_threshold"]
    assert not report.passed
    assert (tmp_path / "report" / "diff_heatmap.png").is_file()
