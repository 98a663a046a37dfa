"""Compare aligned activations of the two backends: metrics, first divergence, one assertion helper.

The PyTorch (diffusers) side is the reference.  For each aligned layer we
record the relative error ``max|ms - pt| / max|pt|``, the element count outside
``atol + rtol*|pt|``, and where the largest difference sits, against the
tolerance of the run's dtype from :mod:`lora_parity.tolerances`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .tolerances import Tolerance


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
    shape: tuple[int, ...]
    dtype: str
    rel_err: float
    max_abs: float
    mean_abs: float
    ref_max: float
    mismatched: int
    total: int
    worst_index: tuple[int, ...]
    tol_rel: float
    passed: bool
    # low-precision runs: PyTorch's own error against the fp32 reference (the budget's basis)
    ref_rel_err: float | None = None

    def message(self) -> str:
        """The one line a failing parity assertion shows."""
        return (f"{self.component} {self.sgm} <-> {self.diffusers} [{self.dtype}]: "
                f"{self.mismatched}/{self.total} mismatched, max |diff| {self.max_abs:.3g} at {list(self.worst_index)}, "
                f"rel err {self.rel_err:.3g} (tolerance {self.tol_rel:.3g})")


def compare_arrays(a: Aligned, ms: np.ndarray, pt: np.ndarray, tol: Tolerance, dtype: str) -> LayerMetric:
    ms = np.asarray(ms, dtype=np.float64)
    pt = np.asarray(pt, dtype=np.float64)
    if ms.shape != pt.shape:
        if ms.size == pt.size:
            ms = ms.reshape(pt.shape)
        else:
            return LayerMetric(a.sgm, a.diffusers, a.component, a.depth, tuple(pt.shape), dtype, float("inf"),
                               float("inf"), float("inf"), float(np.abs(pt).max(initial=0.0)), pt.size, pt.size,
                               (), tol.rel, False)
    diff = np.abs(ms - pt)
    finite = np.isfinite(ms).all()
    ref_max = float(np.abs(pt).max(initial=0.0))
    max_abs = float(diff.max(initial=0.0)) if finite else float("inf")
    rel = max_abs / ref_max if ref_max > 0 else max_abs
    mism = int((~(diff <= tol.atol + tol.rtol * np.abs(pt))).sum())
    worst = tuple(int(i) for i in np.unravel_index(int(np.nanargmax(diff)), diff.shape)) if diff.size else ()
    return LayerMetric(a.sgm, a.diffusers, a.component, a.depth, tuple(pt.shape), dtype, rel, max_abs,
                       float(diff.mean()) if diff.size else 0.0, ref_max, mism, int(diff.size), worst, tol.rel,
                       bool(finite and rel <= tol.rel))


@dataclass
class ParityReport:
    """All layer metrics of one comparison run, in forward order per component."""

    layers: list[LayerMetric] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    image: dict | None = None  # full-image metrics when images were generated

    @property
    def passed(self) -> bool:
        image_ok = self.image is None or bool(self.image["passed"])
        return not self.missing and all(m.passed for m in self.layers) and image_ok

    @property
    def first_failure(self) -> LayerMetric | None:
        """The first diverging layer in forward order (text encoders, UNet, VAE)."""
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
            "image": self.image,
            "meta": self.meta,
            "layers": [asdict(m) for m in self.layers],
        }

    def table(self) -> str:
        """Short: one row per component (layers, error at the first and last layer, worst layer)."""
        rows = [f"{'component':<15} {'layers':>6} {'first':>9} {'last':>9} {'max':>9} {'tol':>8}  ok   worst layer"]
        for comp in dict.fromkeys(m.component for m in self.layers):
            ms = self.by_component(comp)
            worst = max(ms, key=lambda m: m.rel_err)
            rows.append(f"{comp:<15} {len(ms):>6} {ms[0].rel_err:>9.2e} {ms[-1].rel_err:>9.2e} {worst.rel_err:>9.2e} "
                        f"{worst.tol_rel:>8.1e}  {'yes' if all(m.passed for m in ms) else 'NO ':<3}  {worst.sgm}")
        for name in self.missing:
            rows.append(f"missing: {name}")
        if self.image is not None:
            im = self.image
            rows.append(f"image ({im['steps']} steps, guidance {im['guidance']:g}): MAE {im['mae']:.3f} on 0-255 "
                        f"(threshold {im['mae_threshold']:g}), max {im['max_error']}, PSNR {im['psnr']:.1f} dB, "
                        f"SSIM {im['ssim']:.4f}; s/step MindSpore {im['seconds_per_step']['mindspore']:.3f}, "
                        f"PyTorch {im['seconds_per_step']['pytorch']:.3f}  {'ok' if im['passed'] else 'FAIL'}")
        first = self.first_failure
        if self.passed:
            rows.append("PASS: every aligned layer within tolerance" + (" and images agree" if self.image else ""))
        elif first is not None or self.missing:
            rows.append(f"FAIL: first diverging layer: {first.message() if first else self.missing[0]}")
        else:
            rows.append("FAIL: images differ beyond the threshold")
        return "\n".join(rows)

    def layers_table(self) -> str:
        """Long: every aligned layer in forward order (how error grows through the network)."""
        rows = [f"{'component':<15} {'layer (SGM)':<44} {'rel err':>9} {'tol':>8}  ok"]
        for m in self.layers:
            rows.append(f"{m.component:<15} {m.sgm[-44:]:<44} {m.rel_err:>9.2e} {m.tol_rel:>8.1e}  "
                        f"{'yes' if m.passed else 'NO'}")
        for name in self.missing:
            rows.append(f"{'?':<15} {name[-44:]:<44} {'missing':>9}")
        first = self.first_failure
        rows.append("PASS" if self.passed else f"FAIL: first diverging layer: {first.message() if first else self.missing[0]}")
        return "\n".join(rows)


def compare(alignment: list[Aligned], ms: dict[str, np.ndarray], pt: dict[str, np.ndarray],
            tol: Tolerance, dtype: str) -> ParityReport:
    report = ParityReport()
    for a in alignment:
        if a.sgm not in ms or a.diffusers not in pt:
            report.missing.append(a.sgm if a.sgm not in ms else a.diffusers)
            continue
        report.layers.append(compare_arrays(a, ms[a.sgm], pt[a.diffusers], tol, dtype))
    return report


def compare_low_precision(alignment: list[Aligned], ms: dict[str, np.ndarray], pt: dict[str, np.ndarray],
                          pt_ref: dict[str, np.ndarray], dtype: str) -> ParityReport:
    """fp16/bf16: both sides against PyTorch's fp32 reference, with an error budget per layer.

    MindSpore's error ``rel(ms_lowp, pt_fp32)`` must stay within
    ``max(LAYER[dtype].rel, LOW_PRECISION_FACTOR * rel(pt_lowp, pt_fp32))``: the budget is what
    the reference framework itself loses at that precision on that layer, not a loosened literal.
    """
    from dataclasses import replace

    from .tolerances import LAYER, LOW_PRECISION_FACTOR

    base = LAYER[dtype]
    report = ParityReport()
    for a in alignment:
        if a.sgm not in ms or a.diffusers not in pt or a.diffusers not in pt_ref:
            report.missing.append(a.sgm if a.sgm not in ms else a.diffusers)
            continue
        ref_err = compare_arrays(a, pt[a.diffusers], pt_ref[a.diffusers], base, dtype).rel_err
        budget = replace(base, rel=max(base.rel, LOW_PRECISION_FACTOR * ref_err))
        m = compare_arrays(a, ms[a.sgm], pt_ref[a.diffusers], budget, dtype)
        m.ref_rel_err = ref_err
        report.layers.append(m)
    return report


def assert_layer(metric: LayerMetric, record_property=None) -> None:
    """The one parity assertion: records metrics for CI, fails with the full picture."""
    if record_property is not None:
        record_property(f"rel_err[{metric.component}:{metric.sgm}]", metric.rel_err)
    assert metric.passed, metric.message()


def assert_report(report: ParityReport, record_property=None) -> None:
    if record_property is not None:
        for m in report.layers:
            record_property(f"rel_err[{m.component}:{m.sgm}]", f"{m.rel_err:.3e}")
        record_property("parity_passed", report.passed)
    assert not report.missing, f"layers not captured: {report.missing[:5]}"
    first = report.first_failure
    assert first is None, "first diverging layer: " + first.message()
