"""The gates themselves: both layer statistics (max-normalized error and mismatch fraction), shape
mismatches, every override flag honoured and recorded, and the calibrated image gates.

Faults go through ``run_compare`` with its default options (each side in a child process).  Later
runs of the same inputs reuse the first run's kept captures, so a flag's effect costs no second run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lora_parity.convert import formats
from lora_parity.compare import CompareOptions, run_compare
from lora_parity.convert.converter import load_lora
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.parity.metrics import Aligned, compare_arrays, compare_low_precision
from lora_parity.convert.safetensors_io import write_safetensors
from lora_parity.parity.tolerances import IMAGE_GATES, IMAGE_MAE_MAX, LOW_PRECISION_FACTOR, PORT, layer_gate

from . import gate_faults
from .helpers import run_cli

pytestmark = pytest.mark.parity

UNET = "model.diffusion_model."
ALPHA = 2.0  # random:tiny LoRA: rank 4, alpha 2
TIGHT = 1e-12  # a bound no real run meets
LOOSE = 1.0  # a bound every finite run meets


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    pytest.importorskip("mindspore")
    from lora_parity.fixtures.bundle import write_fixture

    return write_fixture(tmp_path_factory.mktemp("gates") / "fx")


def _fx_opts(fx, **kw) -> CompareOptions:
    return CompareOptions(**{**dict(pt_base=fx.pt_base, ms_base=fx.ms_base, ms_lora=fx.ms_lora, latents=fx.latents),
                             **kw})


def _pt_lora(src, pipeline_dir, out, fault, alpha=None):
    lora = load_lora(src, layout=layout_from_pipeline_dir(pipeline_dir), alpha=alpha)
    write_safetensors(out, *formats.tensors_for(fault(lora), "peft"))
    return out


def _reuse(keep) -> dict:
    return {p.name: p for p in keep.iterdir()}


# ---- the statistics, on arrays ------------------------------------------------------------------------

A = Aligned("sgm.block", "diffusers.block", "unet", 0)


def _outlier_layer(rng) -> np.ndarray:
    """A layer like SDXL's: values of order 1 and one outlier channel hundreds of times larger."""
    ref = rng.standard_normal((1, 32, 16, 16))
    ref[:, 31] *= 300.0
    return ref


def test_small_magnitude_error_passes_max_normalized_but_fails_mismatch():
    rng = np.random.default_rng(0)
    ref = _outlier_layer(rng)
    gate = layer_gate("F32")
    bad = ref.copy()
    bad[:, :4] *= 1 + 10 * gate.atol  # four small channels of 32 off by ~10x the element bound
    m = compare_arrays(A, bad, ref, gate, "F32")
    assert m.rel_err <= m.tol_rel, m.message()  # the max-normalized statistic alone would pass
    assert m.mismatch_fraction > m.mismatch_budget and not m.passed and m.failed == ("mismatch",), m.message()
    ok = compare_arrays(A, ref * (1 + gate.rel / 10), ref, gate, "F32")
    assert ok.passed and ok.mismatched == 0, ok.message()


def test_shape_mismatch_fails_even_with_equal_element_count():
    ref = np.arange(24.0).reshape(2, 3, 4)
    m = compare_arrays(A, ref.reshape(4, 3, 2), ref, layer_gate("F32"), "F32")
    assert not m.passed and m.failed == ("shape",) and m.ms_shape == (4, 3, 2), m.message()
    assert "shape mismatch" in m.message()
    assert compare_arrays(A, ref.copy(), ref, layer_gate("F32"), "F32").passed


def test_low_precision_override_replaces_the_budget_on_every_layer():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 64))
    pt_low = ref + 1e-3 * rng.standard_normal(ref.shape)
    ms = ref + 1e-3 * rng.standard_normal(ref.shape)
    for dtype in ("F16", "BF16"):
        budget = compare_low_precision([A], {A.sgm: ms}, {A.diffusers: pt_low}, {A.diffusers: ref}, layer_gate(dtype))
        m = budget.layers[0]
        assert m.tol_rel == max(layer_gate(dtype).rel, LOW_PRECISION_FACTOR * m.ref_rel_err)
        assert m.rel_source.startswith("budget")
        tight = compare_low_precision([A], {A.sgm: ms}, {A.diffusers: pt_low}, {A.diffusers: ref},
                                      layer_gate(dtype, rel=TIGHT, mismatch=0.0))
        t = tight.layers[0]
        assert (t.tol_rel, t.mismatch_budget) == (TIGHT, 0.0) and not tight.passed
        assert t.rel_source == f"override --tol-{dtype.lower()} {TIGHT:g}"


# ---- faults confined to a small region, through run_compare -----------------------------------------

ATTN = UNET + "input_blocks.3.1.transformer_blocks.0.attn1"  # the fixture's first attention block
CONV2 = UNET + "input_blocks.1.0.out_layers.3"  # random:tiny's first ResBlock conv2 (LoCon)
OUTLIER_CHANNEL = 31  # last GroupNorm group of input_blocks.1 (8 groups of 4 channels)
OUTLIER_GAIN = 100.0  # SDXL-like: one channel two orders of magnitude above the rest
GROUP_SCALE = 2.0


def test_one_head_qk_swap_is_caught_by_both_statistics(fx, tmp_path, record_property):
    """One head's q/k LoRA rows swapped in one block: on the fixture (no outliers, fp32) the error is
    large against max|ref| too; both statistics are recorded."""
    bad = _pt_lora(fx.ms_lora, fx.pt_base, tmp_path / "head.safetensors",
                   lambda l: gate_faults.swap_head_qk(l, ATTN, head=0, head_channels=16))
    report = run_compare(_fx_opts(fx, pt_lora=bad))
    first = report.first_failure
    assert first is not None and first.sgm == UNET + "input_blocks.3", report.table()
    record_property("head_swap_rel_err", first.rel_err)
    record_property("head_swap_mismatch_fraction", first.mismatch_fraction)
    assert first.mismatch_fraction > first.mismatch_budget and first.rel_err > first.tol_rel, first.message()


@pytest.fixture(scope="module")
def outlier_base(tmp_path_factory):
    """random:tiny with one conv_in output channel amplified: an SDXL-like outlier channel that the
    residual stream carries through input_blocks.1 (both sides load this same folder)."""
    pytest.importorskip("mindspore")
    from safetensors.numpy import load_file, save_file

    from lora_parity.bases import resolve_base
    from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

    tmp = tmp_path_factory.mktemp("outlier")
    b = resolve_base("random:tiny", cache=tmp / "cache")
    base = tmp / "outlier_base"
    shutil.copytree(b.pipeline_dir, base)
    (unet_file,) = (base / "unet").glob("diffusion_pytorch_model*.safetensors")
    weights = load_file(str(unet_file))
    for name in ("conv_in.weight", "conv_in.bias"):
        w = weights[name].astype(np.float32)
        w[OUTLIER_CHANNEL] *= OUTLIER_GAIN
        weights[name] = w.astype(weights[name].dtype)
    save_file(weights, str(unet_file))
    lora = tmp / "locon.ckpt"
    write_ms_lora(lora, make_lora(layout_from_pipeline_dir(base), rank=4, alpha=ALPHA, modules="all", seed=5,
                                  b_std=0.1))
    return base, b.variant, lora


def test_one_group_scaled_under_outliers_passes_max_normalized_but_fails_mismatch(outlier_base, tmp_path,
                                                                                 record_property):
    """fp16 (budgets against the fp32 reference): one GroupNorm group's LoRA of one ResBlock conv
    doubled, beside an outlier channel.  max|ref| is set by the outlier, so the max-normalized error
    stays within its budget; the mismatch fraction catches it.  Then --tol-f16 / --mismatch-f16."""
    base, variant, lora = outlier_base
    bad = _pt_lora(lora, base, tmp_path / "group.safetensors",
                   lambda l: gate_faults.scale_group(l, CONV2, group=0, group_channels=4, factor=GROUP_SCALE),
                   alpha=ALPHA)
    keep = tmp_path / "captures"
    opts = dict(base=str(base), variant=variant, ms_lora=lora, pt_lora=bad, alpha=ALPHA, dtype="F16")
    report = run_compare(CompareOptions(**opts, keep_captures=keep))
    first = report.first_failure
    assert first is not None and first.sgm == UNET + "input_blocks.1", report.table()
    record_property("group_scale_rel_err", first.rel_err)
    record_property("group_scale_rel_bound", first.tol_rel)
    record_property("group_scale_mismatch_fraction", first.mismatch_fraction)
    assert first.rel_err <= first.tol_rel, first.message()  # max-normalized alone: pass
    assert first.failed == ("mismatch",), first.message()
    # --mismatch-f16: a loose bound flips the verdict of the mismatch statistic, recorded as applied
    loose = run_compare(CompareOptions(**opts, mismatch_overrides={"F16": LOOSE}, reuse_captures=_reuse(keep)))
    assert loose.passed, loose.table()
    assert {m.mismatch_budget for m in loose.layers} == {LOOSE}
    assert {m.mismatch_source for m in loose.layers} == {f"override --mismatch-f16 {LOOSE:g}"}
    # --tol-f16: a tight bound fails the same (otherwise passing) run on the max-normalized statistic
    tight = run_compare(CompareOptions(**opts, mismatch_overrides={"F16": LOOSE}, tol_overrides={"F16": TIGHT},
                                       reuse_captures=_reuse(keep)))
    assert not tight.passed and "rel" in tight.first_failure.failed
    assert {m.tol_rel for m in tight.layers} == {TIGHT}


# ---- fp32 overrides, from the command line to report.json ---------------------------------------------

def test_tol_f32_and_mismatch_f32_change_the_verdict_and_are_recorded(fx, tmp_path):
    code, out, err = run_cli(["compare", "--pt-base", str(fx.pt_base), "--ms-base", str(fx.ms_base), "--ms-lora",
                              str(fx.ms_lora), "--latents", str(fx.latents), "--tol-f32", str(TIGHT),
                              "--report", str(tmp_path / "tight"), "--quiet"])
    assert code == 1, out + err
    rep = json.loads((tmp_path / "tight" / "report.json").read_text())
    assert {m["tol_rel"] for m in rep["layers"]} == {TIGHT}
    assert rep["meta"]["tolerance"]["rel"] == TIGHT and rep["meta"]["tolerance"]["rel_source"].startswith("override")
    # a fault caught by both statistics: lifting only the max-normalized bound still fails (mismatch) ...
    bad = _pt_lora(fx.ms_lora, fx.pt_base, tmp_path / "head.safetensors",
                   lambda l: gate_faults.swap_head_qk(l, ATTN, head=0, head_channels=16))
    keep = tmp_path / "captures"
    lifted = dict(tol_overrides={"F32": LOOSE}, rms_overrides={"F32": LOOSE})  # and the local rows' RMS bound
    one = run_compare(_fx_opts(fx, pt_lora=bad, keep_captures=keep, **lifted))
    assert not one.passed and one.first_failure.failed == ("mismatch",), one.first_failure.message()
    # ... and --mismatch-f32 lifts the other
    both = run_compare(_fx_opts(fx, pt_lora=bad, mismatch_overrides={"F32": LOOSE}, reuse_captures=_reuse(keep),
                                **lifted))
    assert both.passed and {m.mismatch_budget for m in both.layers} == {LOOSE}
    assert {m.rms_budget for m in both.layers} == {LOOSE}


def test_every_threshold_flag_reaches_the_options(monkeypatch):
    """Each compare flag lands in CompareOptions (the verdict tests above go through run_compare)."""
    import lora_parity.compare as compare_mod
    from lora_parity.parity.metrics import ParityReport

    seen = {}

    def fake(o):
        seen["o"] = o
        return ParityReport()

    monkeypatch.setattr(compare_mod, "run_compare", fake)
    code, _, err = run_cli(["compare", "--base", "random:tiny", "--tol-f32", "1", "--tol-f16", "2", "--tol-bf16", "3",
                            "--mismatch-f32", "0.1", "--mismatch-f16", "0.2", "--mismatch-bf16", "0.3",
                            "--rms-f32", "0.01", "--rms-f16", "0.02", "--rms-bf16", "0.03",
                            "--image-mae", "4", "--image-max-error", "5"])
    assert code == 0, err
    o = seen["o"]
    assert o.tol_overrides == {"F32": 1.0, "F16": 2.0, "BF16": 3.0}
    assert o.mismatch_overrides == {"F32": 0.1, "F16": 0.2, "BF16": 0.3}
    assert o.rms_overrides == {"F32": 0.01, "F16": 0.02, "BF16": 0.03}
    assert (o.image_mae, o.image_max_error) == (4.0, 5)


def test_pytest_threshold_options_flow_into_compare_options(request):
    from conftest import gate_overrides

    got = gate_overrides(request.config)
    assert set(got) == {"tol_overrides", "mismatch_overrides", "rms_overrides", "image_mae", "image_max_error"}
    assert CompareOptions(**got).tol_overrides["F32"] == request.config.getoption("--tol-f32")


# ---- image gates -------------------------------------------------------------------------------------

STEPS = 3


@pytest.mark.image
def test_ten_percent_lora_scale_error_fails_the_fp32_image_gate(fx, tmp_path, record_property):
    """lora_B x 1.1 in the PyTorch file (alpha 10% off): fails the calibrated fp32 gate, while the old
    cross-device bar (MAE < 5) would have let it through; --image-mae / --image-max-error then flip it."""
    bad = _pt_lora(fx.ms_lora, fx.pt_base, tmp_path / "scale.safetensors", lambda l: gate_faults.scale_all_b(l, 1.1))
    keep = tmp_path / "captures"
    report = run_compare(_fx_opts(fx, pt_lora=bad, steps=STEPS, keep_captures=keep))
    im = report.image
    record_property("scale_1.1_image_mae", im["mae"])
    record_property("scale_1.1_image_max_error", im["max_error"])
    gate = im["gate"]
    assert (gate["mae"], gate["max_error"]) == (IMAGE_GATES[(PORT, "F32")].mae, IMAGE_GATES[(PORT, "F32")].max_error)
    assert gate["dtype"] == "F32" and gate["backend"] == PORT and not gate["cross_device"] and gate["reason"]
    assert not im["passed"] and im["mae"] > gate["mae"]
    # layers are lifted so that only the image decides
    layers_off = dict(tol_overrides={"F32": LOOSE}, mismatch_overrides={"F32": LOOSE}, rms_overrides={"F32": LOOSE},
                      reuse_captures=_reuse(keep))
    lifted = run_compare(_fx_opts(fx, pt_lora=bad, steps=STEPS, image_mae=IMAGE_MAE_MAX, image_max_error=255,
                                  **layers_off))
    assert lifted.image["passed"] and lifted.passed, lifted.table()
    assert lifted.image["mae_threshold"] == IMAGE_MAE_MAX
    assert lifted.image["gate"]["mae_source"] == f"override --image-mae {IMAGE_MAE_MAX:g}"
    assert lifted.image["gate"]["max_error_source"] == "override --image-max-error 255"


def test_image_gate_is_chosen_by_dtype_backend_and_device():
    from lora_parity.parity.tolerances import IMAGE_GATE_CROSS_DEVICE, image_gate

    for dtype in ("F32", "F16", "BF16"):
        same = image_gate(dtype)
        assert same["mae"] == IMAGE_GATES[(PORT, dtype)].mae and not same["cross_device"]
        cross = image_gate(dtype, ms_device="Ascend", pt_device="cuda")
        assert cross["mae"] == IMAGE_GATE_CROSS_DEVICE.mae and cross["max_error"] is None and cross["cross_device"]
    assert IMAGE_GATES[(PORT, "F32")].mae < IMAGE_GATES[(PORT, "F16")].mae <= IMAGE_GATE_CROSS_DEVICE.mae
