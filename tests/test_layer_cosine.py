"""Per-layer cosine similarity (the number Ascend's msprobe and MindSpore's TroubleShooter print): computed in
float64 over the flattened layer, None where there is no direction to compare, reported and never gated."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lora_parity.parity.metrics import Aligned, ParityReport, compare_arrays, cosine_similarity
from lora_parity.parity.tolerances import layer_gate

pytestmark = pytest.mark.parity

POINT = Aligned("model.diffusion_model.out", "unet.conv_out", "unet", 0)


def test_cosine_values():
    a = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    assert cosine_similarity(a, a) == pytest.approx(1.0, abs=1e-15)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0, abs=1e-15)
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
    assert cosine_similarity(a, a.reshape(-1)) == pytest.approx(1.0)  # flattened
    b = a.copy()
    b.flat[0] += 1.0
    assert 0.9 < cosine_similarity(b, a) < 1.0


@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
def test_cosine_is_none_without_a_direction(bad):
    a = np.ones((2, 3), np.float32)
    b = {"zero": np.zeros((2, 3)), "nan": np.full((2, 3), np.nan), "inf": np.array([[np.inf, 1, 1], [1, 1, 1]])}[bad]
    assert cosine_similarity(a, b) is None and cosine_similarity(b, a) is None


def test_cosine_is_reported_not_gated():
    """A 10% scale error keeps the direction (cosine 1) and fails the layer; a passing layer reports ~1."""
    gate = layer_gate("F32", "mindone")
    ref = np.random.default_rng(1).standard_normal((4, 16))
    scaled = compare_arrays(POINT, ref * 1.1, ref, gate, "F32")
    assert not scaled.passed and scaled.cosine == pytest.approx(1.0, abs=1e-12)
    same = compare_arrays(POINT, ref + 1e-9, ref, gate, "F32")
    assert same.passed and same.cosine == pytest.approx(1.0, abs=1e-12)
    flipped = compare_arrays(POINT, -ref, ref, gate, "F32")
    assert not flipped.passed and flipped.cosine == pytest.approx(-1.0)
    shape = compare_arrays(POINT, ref[:2], ref, gate, "F32")
    assert shape.cosine is None and "shape" in shape.failed
    nan = compare_arrays(POINT, np.full_like(ref, np.nan), ref, gate, "F32")
    assert nan.cosine is None and not nan.passed
    data = ParityReport(layers=[same, nan]).to_dict()
    assert [m["cosine"] for m in data["layers"]] == [same.cosine, None]
    assert json.dumps(data["layers"][0]["cosine"], allow_nan=False)
