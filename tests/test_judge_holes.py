"""The judge's holes, closed: each test shows the run that used to pass unjudged now fails, and the
correct run beside it still passes.  Synthetic captures (tests/synthetic_sides.py) fed to the real
``judge`` / ``compare_bundles``: no model runs, so every case takes milliseconds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lora_parity.compare import CompareOptions, judge
from lora_parity.errors import LoraParityError
from lora_parity.parity.metrics import ParityReport
from lora_parity.sides.bundle import read_bundle, write_bundle

from .helpers import run_cli
from .synthetic_sides import request, sides, write_configs

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return write_configs(tmp_path_factory.mktemp("configs"))


def _judge(configs, ms, pt, **kw):
    return judge(CompareOptions(ms_backend="mindone", **kw), configs, ms, pt, None)


# ---------------------------------------------------------------- --steps asked, an image missing


def test_both_images_judged_when_steps_asked(configs):
    ms, pt = sides(configs, steps=2, images=(True, True))
    report, images = _judge(configs, ms, pt, steps=2)
    assert report.passed and report.image["passed"] and images is not None


@pytest.mark.parametrize("held, missing", [((False, True), "MindSpore (mindone)"), ((True, False), "PyTorch fp32"),
                                           ((False, False), "MindSpore (mindone) and the PyTorch fp32")])
def test_steps_asked_and_a_side_without_image_fails(configs, held, missing):
    """Every layer agrees; before, the judge compared layers only and passed."""
    ms, pt = sides(configs, steps=2, images=held)
    report, images = _judge(configs, ms, pt, steps=2)
    assert all(m.passed for m in report.layers) and report.layers
    assert not report.passed and images is None
    assert report.image["passed"] is False and f"the {missing} capture holds no image" in report.image["reason"]
    assert "holds no image" in report.table().splitlines()[-1]
    assert json.dumps(report.to_dict(), allow_nan=False)  # the report keeps its JSON shape


def test_bundle_steps_count_when_options_have_none(configs):
    """compare --ms-bundle/--pt-bundle passes no --steps: the captures' own request (inputs.steps) decides."""
    ms, pt = sides(configs, steps=2, images=(True, False))
    report, _ = _judge(configs, ms, pt)  # CompareOptions.steps is None
    assert not report.passed and "PyTorch fp32" in report.image["reason"]
    ms, pt = sides(configs, steps=None, images=(False, False))  # no steps asked: layers only, as before
    report, _ = _judge(configs, ms, pt)
    assert report.passed and report.image is None


# ---------------------------------------------------------------- non-finite pixels


@pytest.mark.parametrize("where", ["ms", "pt", "both"])
def test_nonfinite_pixels_fail_naming_the_side(configs, where):
    ms, pt = sides(configs, steps=2, images=(True, True))
    for side in ((ms, pt) if where == "both" else (ms if where == "ms" else pt,)):
        side.images["image"][2, 3, :] = np.nan
    report, images = _judge(configs, ms, pt, steps=2)
    assert not report.passed and report.image["passed"] is False
    reason = report.image["reason"]
    assert ("MindSpore (mindone) image has 3 of 192" in reason) == (where in ("ms", "both")), reason
    assert ("PyTorch fp32 image has 3 of 192" in reason) == (where in ("pt", "both")), reason
    if where == "both":  # to_uint8 makes both 0 there: the metrics alone would call them identical
        assert report.image["mae"] == 0 and report.image["max_error"] == 0
    assert "non-finite pixels" in report.table().splitlines()[-1]


def test_infinite_pixels_fail_too(configs):
    ms, pt = sides(configs, steps=2, images=(True, True))
    ms.images["image"][0, 0, 0] = np.inf
    report, _ = _judge(configs, ms, pt, steps=2)
    assert not report.passed and report.image["nonfinite_pixels"] == {"MindSpore (mindone)": 1}


# ---------------------------------------------------------------- zero aligned layers


def test_no_aligned_layer_fails(configs):
    """Captures that share none of the aligned activations: nothing was compared, so nothing passed."""
    from lora_parity.compare import _judge_images_and_run
    from lora_parity.parity.judge_checks import NO_LAYERS

    ms, pt = sides(configs)
    empty = ParityReport(meta={"backend": "mindone"})
    assert empty.passed  # what an empty report says on its own
    _judge_images_and_run(CompareOptions(ms_backend="mindone"), empty, ms, pt, None, "mindone",
                          {"pytorch": pt.meta, "mindspore": ms.meta})
    assert not empty.passed and empty.failures == [NO_LAYERS]
    assert empty.table().splitlines()[-1] == f"FAIL: {NO_LAYERS}"
    assert empty.to_dict()["failures"] == [NO_LAYERS]
    ms.acts.clear()  # through judge: a MindSpore capture without activations, no layer compared
    report, _ = _judge(configs, ms, pt)
    assert not report.passed and not report.layers and NO_LAYERS in report.failures


# ---------------------------------------------------------------- refiner conditioning recorded


def test_aesthetic_scores_recorded(configs):
    ms, pt = sides(configs, aesthetic=[6.0, 2.5])
    report, _ = _judge(configs, ms, pt)
    assert (report.meta["aesthetic_score"], report.meta["negative_aesthetic_score"]) == (6.0, 2.5)
    ms, pt = sides(configs)  # a base model: null
    report, _ = _judge(configs, ms, pt)
    assert report.meta["aesthetic_score"] is None and report.meta["negative_aesthetic_score"] is None


# ---------------------------------------------------------------- bundle manifests


def _bundle(configs, tmp_path, name="ms_bundle"):
    ms, _ = sides(configs)
    return write_bundle(tmp_path / name, request(configs, "ms"), ms, base="synthetic", lora=None)


@pytest.mark.parametrize("field, value, says", [("backend", "tensorflow", "unknown backend 'tensorflow'"),
                                                ("backend", None, "unknown backend None"),
                                                ("naming", "kohya", "naming 'kohya'"),
                                                ("side", "pt", "side 'pt'")])
def test_bundle_with_unknown_backend_or_naming_is_refused(configs, tmp_path, field, value, says):
    b = _bundle(configs, tmp_path)
    assert read_bundle(b).backend == "mindone"  # the bundle as written reads back
    manifest = json.loads((b / "bundle.json").read_text())
    manifest[field] = value
    (b / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(LoraParityError) as exc:
        read_bundle(b)
    assert says in str(exc.value) and str(b) in str(exc.value)
    pt = write_bundle(tmp_path / "pt_bundle", request(configs, "pt"), sides(configs)[1], base="synthetic", lora=None)
    code, _, err = run_cli(["compare", "--ms-bundle", str(b), "--pt-bundle", str(pt)])
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-parity: error:")]
    assert code == 2 and len(lines) == 1 and says in lines[0] and str(b) in lines[0], err
