"""Compare aligned activations of the two backends: metrics, first divergence, one assertion helper.

The PyTorch (diffusers) side is the reference.  For each aligned layer we record two statistics
and judge both against the layer gate of the run's backend and dtype (:mod:`lora_parity.parity.tolerances`):
the normalized max error ``max|ms - pt| / max|pt|`` and the mismatch fraction
``mean(|ms - pt| > atol * median|pt| + rtol * |pt|)``.  A layer passes only if both are within
their bound; the bounds applied, and where they came from, are recorded per layer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from lora_parity.parity.tolerances import LOW_PRECISION_FACTOR, LayerGate


@dataclass(frozen=True)
class Aligned:
    """One comparison point: the SGM block name and the diffusers module that ends it."""

    sgm: str
    diffusers: str
    component: str  # unet | text_encoder | text_encoder_2 | vae | conditioning
    depth: int  # position in the component's forward order


@dataclass
class LayerMetric:
    sgm: str
    diffusers: str
    component: str
    depth: int
    shape: tuple[int, ...]  # the reference's (PyTorch's) shape
    dtype: str
    rel_err: float  # max|a-b| / max|ref|
    max_abs: float
    mean_abs: float
    ref_max: float
    mismatched: int  # elements outside atol_abs + rtol*|ref| (all of them on a shape mismatch)
    total: int
    worst_index: tuple[int, ...]
    tol_rel: float  # the bound applied to rel_err on this layer
    passed: bool
    # low-precision runs: PyTorch's own error against the fp32 reference (the budget's basis)
    ref_rel_err: float | None = None
    mismatch_fraction: float = 0.0  # mismatched / total
    mismatch_budget: float = 0.0  # the bound applied to mismatch_fraction on this layer
    ref_median_abs: float = 0.0  # median|ref|: the scale of the absolute element tolerance
    atol: float = 0.0  # the absolute element tolerance applied (gate atol x median|ref|)
    rtol: float = 0.0
    ref_mismatch_fraction: float | None = None  # low precision: PyTorch's own, same element bound
    rel_source: str = "table"  # where tol_rel came from (table / budget / override)
    mismatch_source: str = "table"
    backend: str = "port"
    ms_shape: tuple[int, ...] | None = None  # MindSpore's shape (differs only on a shape mismatch)
    failed: tuple[str, ...] = ()  # which checks failed: "shape", "finite", "rel", "mismatch", "noop", "ref-finite"
    kind: str = "chained"  # chained (the whole run), local (the block replayed on PyTorch's inputs), effect (the LoRA's)
    row: str = "chained"  # the tolerance row applied (tolerances.point_gate)
    effect_size: float | None = None  # effect rows: max|effect| on the PyTorch side (the error's denominator)
    effect_size_ms: float | None = None  # ... and on the MindSpore side
    note: str = ""  # why a check failed, in words, where the statistics alone do not say (no-op, non-finite side)
    # reported, never gated: cos(ms, ref) in float64 over the flattened layer, as msprobe / TroubleShooter print it
    cosine: float | None = None
    # RMS error relative to the reference's RMS, ||a-b|| / ||ref||: a wrong constant (a norm's eps) moves every
    # element a little, where rounding leaves a few tails; gated where the row has an ``rms`` bound (local rows)
    rms_rel: float = 0.0
    rms_budget: float | None = None
    rms_source: str = "table"

    @property
    def rel_passed(self) -> bool:
        return "rel" not in self.failed and "shape" not in self.failed and "finite" not in self.failed

    @property
    def mismatch_passed(self) -> bool:
        return "mismatch" not in self.failed and "shape" not in self.failed

    def message(self) -> str:
        """The one line a failing parity assertion shows."""
        head = f"{self.component} {self.sgm} <-> {self.diffusers} [{self.dtype}, {self.kind}]: "
        if self.note:
            return head + self.note
        if self.kind == "effect":
            why = f" FAILED: {', '.join(self.failed)}" if self.failed else ""
            return (head + f"LoRA effect differs by {self.max_abs:.3g} = {self.rel_err:.3g} of its size "
                    f"{self.effect_size:.3g} (tolerance {self.tol_rel:.3g}){why}")
        if "shape" in self.failed:
            return head + f"shape mismatch: MindSpore {list(self.ms_shape or ())} vs PyTorch {list(self.shape)}"
        why = f" FAILED: {', '.join(self.failed)}" if self.failed else ""
        return (head + f"{self.mismatched}/{self.total} mismatched ({self.mismatch_fraction:.3g}, budget "
                f"{self.mismatch_budget:.3g}; |diff| > {self.atol:.3g} + {self.rtol:.3g}*|ref|), "
                f"max |diff| {self.max_abs:.3g} at {list(self.worst_index)}, "
                f"rel err {self.rel_err:.3g} (tolerance {self.tol_rel:.3g})"
                + (f", rms err {self.rms_rel:.3g} (tolerance {self.rms_budget:.3g})" if self.rms_budget is not None
                   else "") + why)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float | None:
    """cos(a, b) of the flattened arrays in float64 (the per-layer number Ascend's msprobe and MindSpore's
    TroubleShooter print); None when either has zero norm or a non-finite value (no direction to compare)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0 or not np.isfinite(na * nb):
        return None
    return float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))


def _stats(ms: np.ndarray, pt: np.ndarray, tol: LayerGate) -> dict:
    """Both statistics of ``ms`` against the reference ``pt`` (same shape), under ``tol``'s element bound."""
    diff = np.abs(ms - pt)
    finite = bool(np.isfinite(ms).all())
    apt = np.abs(pt)
    ref_max = float(apt.max(initial=0.0))
    scale = float(np.median(apt)) if apt.size else 0.0
    atol = tol.atol * scale
    max_abs = float(diff.max(initial=0.0)) if finite else float("inf")
    rel = max_abs / ref_max if ref_max > 0 else max_abs
    mism = int((~(diff <= atol + tol.rtol * apt)).sum())  # NaN counts as a mismatch
    worst = tuple(int(i) for i in np.unravel_index(int(np.nanargmax(diff)), diff.shape)) \
        if diff.size and not np.isnan(diff).all() else ()
    ref_rms = float(np.sqrt(np.mean(pt * pt))) if pt.size else 0.0
    err_rms = float(np.sqrt(np.mean(diff * diff))) if finite and diff.size else (float("inf") if diff.size else 0.0)
    rms = err_rms / ref_rms if ref_rms > 0 else err_rms
    return dict(finite=finite, ref_max=ref_max, scale=scale, atol=atol, max_abs=max_abs, rel=rel, mism=mism,
                total=int(diff.size), worst=worst, mean_abs=float(diff.mean()) if diff.size else 0.0,
                cosine=cosine_similarity(ms, pt), rms=rms)


def compare_arrays(a: Aligned, ms: np.ndarray, pt: np.ndarray, tol: LayerGate, dtype: str, *,
                   rel_source: str | None = None, mismatch_source: str | None = None,
                   rms_source: str | None = None) -> LayerMetric:
    """Judge one layer: passes only if shapes are equal, values finite, and every gated statistic within ``tol``."""
    ms = np.asarray(ms, dtype=np.float64)
    pt = np.asarray(pt, dtype=np.float64)
    common = dict(tol_rel=tol.rel, mismatch_budget=tol.mismatch, rtol=tol.rtol,
                  rel_source=rel_source or tol.rel_source, mismatch_source=mismatch_source or tol.mismatch_source,
                  backend=tol.backend, ms_shape=tuple(ms.shape), row=tol.row, rms_budget=tol.rms,
                  rms_source=rms_source or tol.rms_source)
    if ms.shape != pt.shape:  # never reshaped: a layout bug can keep the element count
        return LayerMetric(a.sgm, a.diffusers, a.component, a.depth, tuple(pt.shape), dtype, float("inf"),
                           float("inf"), float("inf"), float(np.abs(pt).max(initial=0.0)), pt.size, pt.size,
                           (), passed=False, mismatch_fraction=1.0, failed=("shape",), **common)
    s = _stats(ms, pt, tol)
    frac = s["mism"] / s["total"] if s["total"] else 0.0
    failed = tuple(name for name, bad in (("finite", not s["finite"]), ("rel", not s["rel"] <= tol.rel),
                                          ("mismatch", not frac <= tol.mismatch),
                                          ("rms", tol.rms is not None and not s["rms"] <= tol.rms)) if bad)
    return LayerMetric(a.sgm, a.diffusers, a.component, a.depth, tuple(pt.shape), dtype, s["rel"], s["max_abs"],
                       s["mean_abs"], s["ref_max"], s["mism"], s["total"], s["worst"], passed=not failed,
                       mismatch_fraction=frac, ref_median_abs=s["scale"], atol=s["atol"], failed=failed,
                       cosine=s["cosine"], rms_rel=s["rms"], **common)


@dataclass
class ParityReport:
    """All layer metrics of one comparison run, in forward order per component."""

    layers: list[LayerMetric] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    image: dict | None = None  # full-image metrics when images were generated
    failures: list[str] = field(default_factory=list)  # the run's own failures, no one layer's (no layer compared)

    @property
    def passed(self) -> bool:
        image_ok = self.image is None or bool(self.image["passed"])
        return not self.missing and not self.failures and all(m.passed for m in self.layers) and image_ok

    @property
    def first_failure(self) -> LayerMetric | None:
        """The first diverging layer in forward order (text encoders, UNet, VAE): by its local error first (the
        block that adds the error holds the fault), then chained, then the LoRA's effect."""
        for kind in ("local", "chained", "effect"):
            hit = next((m for m in self.layers if not m.passed and m.kind == kind), None)
            if hit is not None:
                return hit
        return next((m for m in self.layers if not m.passed), None)

    def by_component(self, component: str) -> list[LayerMetric]:
        return [m for m in self.layers if m.component == component]

    def to_dict(self) -> dict:
        first = self.first_failure
        return {
            "passed": self.passed,
            "first_diverging_layer": None if first is None else {"sgm": first.sgm, "diffusers": first.diffusers,
                                                                  "component": first.component,
                                                                  "message": first.message()},
            "missing": self.missing,
            "failures": self.failures,
            "image": self.image,
            "meta": self.meta,
            "layers": [asdict(m) for m in self.layers],
        }

    def table(self) -> str:
        """Short: one row per component (layers, error at the first and last layer, worst layer)."""
        rows = [f"{'component':<15} {'kind':<7} {'layers':>6} {'first':>9} {'last':>9} {'max':>9} {'tol':>8}  ok   "
                f"worst layer"]
        for comp in dict.fromkeys(m.component for m in self.layers):
            for kind in ("local", "chained", "effect"):
                ms = [m for m in self.by_component(comp) if m.kind == kind]
                if not ms:
                    continue
                worst = max(ms, key=lambda m: (not m.passed, m.rel_err / m.tol_rel if m.tol_rel else m.rel_err))
                rows.append(f"{comp:<15} {kind:<7} {len(ms):>6} {ms[0].rel_err:>9.2e} {ms[-1].rel_err:>9.2e} "
                            f"{worst.rel_err:>9.2e} {worst.tol_rel:>8.1e}  {'yes' if all(m.passed for m in ms) else 'NO ':<3}"
                            f"  {worst.sgm}")
        for name in self.missing:
            rows.append(f"missing: {name}")
        for text in self.failures:
            rows.append(f"failed: {text}")
        if self.image is not None and self.image.get("mae") is None:  # no image to measure (judge_checks)
            rows.append(f"image: {self.image.get('reason', 'not compared')}  FAIL")
        elif self.image is not None:
            im = self.image
            rows.append(f"image ({im['steps']} steps, guidance {im['guidance']:g}): MAE {im['mae']:.3f} on 0-255 "
                        f"(threshold {im['mae_threshold']:g}), max {im['max_error']}"
                        + (f" (threshold {im['max_error_threshold']})" if im.get("max_error_threshold") is not None else "")
                        + f", PSNR {im['psnr']:.1f} dB, "
                        f"SSIM {im['ssim']:.4f}; s/step MindSpore {im['seconds_per_step']['mindspore']:.3f}, "
                        f"PyTorch {im['seconds_per_step']['pytorch']:.3f}  {'ok' if im['passed'] else 'FAIL'}")
        if self.meta.get("replay"):
            rows.append("note: " + self.meta["replay"])
        first = self.first_failure
        if self.passed:
            rows.append("PASS: every aligned layer within tolerance" + (" and images agree" if self.image else ""))
        elif first is not None or self.missing:
            rows.append(f"FAIL: first diverging layer: {first.message() if first else self.missing[0]}")
        elif self.failures:
            rows.append(f"FAIL: {self.failures[0]}")
        else:
            rows.append(f"FAIL: {(self.image or {}).get('reason') or 'images differ beyond the threshold'}")
        return "\n".join(rows)

    def layers_table(self) -> str:
        """Long: every aligned layer in forward order (how error grows through the network)."""
        rows = [f"{'component':<15} {'kind':<7} {'layer (SGM)':<44} {'rel err':>9} {'tol':>8}  ok"]
        for m in self.layers:
            rows.append(f"{m.component:<15} {m.kind:<7} {m.sgm[-44:]:<44} {m.rel_err:>9.2e} {m.tol_rel:>8.1e}  "
                        f"{'yes' if m.passed else 'NO'}")
        for name in self.missing:
            rows.append(f"{'?':<15} {name[-44:]:<44} {'missing':>9}")
        first = self.first_failure
        if self.passed:
            rows.append("PASS")
        elif first is not None or self.missing:
            rows.append(f"FAIL: first diverging layer: {first.message() if first else self.missing[0]}")
        else:
            rows.append(f"FAIL: {(self.failures or [(self.image or {}).get('reason') or 'images differ'])[0]}")
        return "\n".join(rows)


def compare(alignment: list[Aligned], ms: dict[str, np.ndarray], pt: dict[str, np.ndarray],
            tol: LayerGate, dtype: str) -> ParityReport:
    report = ParityReport()
    for a in alignment:
        if a.sgm not in ms or a.diffusers not in pt:
            report.missing.append(a.sgm if a.sgm not in ms else a.diffusers)
            continue
        report.layers.append(compare_arrays(a, ms[a.sgm], pt[a.diffusers], tol, dtype))
    return report


def compare_low_precision(alignment: list[Aligned], ms: dict[str, np.ndarray], pt: dict[str, np.ndarray],
                          pt_ref: dict[str, np.ndarray], gate: LayerGate) -> ParityReport:
    """fp16/bf16: both sides against PyTorch's fp32 reference, with an error budget per layer.

    Each statistic of MindSpore's low-precision run against the fp32 reference must stay within
    ``max(gate value, LOW_PRECISION_FACTOR * PyTorch's own low-precision statistic)`` on that layer:
    the budget is what the reference framework itself loses at that precision there, not a loosened
    literal.  A statistic whose gate value was overridden (``gate.rel_source`` / ``mismatch_source``
    not "table") uses the override as its bound on every layer instead of the budget.
    """
    dtype = gate.dtype
    report = ParityReport()
    for a in alignment:
        if a.sgm not in ms or a.diffusers not in pt or a.diffusers not in pt_ref:
            report.missing.append(a.sgm if a.sgm not in ms else a.diffusers)
            continue
        own = compare_arrays(a, pt[a.diffusers], pt_ref[a.diffusers], gate, dtype)
        ref_frac = own.mismatch_fraction
        budget, src = gate, {}
        if gate.rel_source == "table":
            budget = replace(budget, rel=max(gate.rel, LOW_PRECISION_FACTOR * own.rel_err))
            src["rel_source"] = f"budget max({gate.rel:.3g}, {LOW_PRECISION_FACTOR:g} x pytorch {dtype.lower()} error)"
        if gate.mismatch_source == "table":
            budget = replace(budget, mismatch=max(gate.mismatch, LOW_PRECISION_FACTOR * ref_frac))
            src["mismatch_source"] = (f"budget max({gate.mismatch:.3g}, {LOW_PRECISION_FACTOR:g} x pytorch "
                                      f"{dtype.lower()} mismatch fraction)")
        m = compare_arrays(a, ms[a.sgm], pt_ref[a.diffusers], budget, dtype, **src)
        m.ref_rel_err = own.rel_err
        m.ref_mismatch_fraction = ref_frac
        report.layers.append(m)
    return report


def assert_layer(metric: LayerMetric, record_property=None) -> None:
    """The one parity assertion: records metrics for CI, fails with the full picture."""
    if record_property is not None:
        record_property(f"rel_err[{metric.component}:{metric.sgm}]", metric.rel_err)
        record_property(f"mismatch_fraction[{metric.component}:{metric.sgm}]", metric.mismatch_fraction)
    assert metric.passed, metric.message()


def assert_report(report: ParityReport, record_property=None) -> None:
    if record_property is not None:
        for m in report.layers:
            record_property(f"rel_err[{m.component}:{m.sgm}]", f"{m.rel_err:.3e}")
            record_property(f"mismatch_fraction[{m.component}:{m.sgm}]", f"{m.mismatch_fraction:.3e}")
        record_property("parity_passed", report.passed)
    assert not report.missing, f"layers not captured: {report.missing[:5]}"
    first = report.first_failure
    assert first is None, "first diverging layer: " + first.message()
