"""Judge two captures layer by layer: chained errors, local (replayed) errors and the LoRA's own effect.

* **chained**: each aligned output of the MindSpore run against PyTorch's, by the component's row
  (the UNet's carries the timestep sinusoid's propagation; text encoders, prompt embedding and VAE are tight);
* **local**: each block replayed on PyTorch's outputs of the blocks before it (``LOCAL`` activations), by the
  tight local row -- what the block alone adds, so the first failing local layer is the block holding a fault;
* **effect**: for the blocks the LoRA file targets, the LoRA's effect (replayed with - without, on the same
  inputs) on each side, judged relative to its own size; an effect of exactly zero on either side is a
  LoRA that did not act (a silent no-op load) and fails naming the side.

fp16/bf16: each statistic's bound is ``max(row, LOW_PRECISION_FACTOR x PyTorch's own statistic in that dtype)``
against PyTorch's fp32 reference, for chained, local and effect alike; a PyTorch statistic that is not finite
never widens a budget: the layer fails, naming the side that went non-finite.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from lora_parity.parity.metrics import Aligned, LayerMetric, ParityReport, compare_arrays
from lora_parity.parity.tolerances import LOW_PRECISION_FACTOR, point_gate

LOCAL = "local/"  # the replayed outputs (lora_parity.backends.replay.LOCAL)
NOLORA = "nolora/"
# points whose value only concatenates other points' outputs: judged chained, not replayed
NOT_REPLAYED = ("conditioner.context", "conditioning.prompt_embeds",
                "conditioning.pooled_prompt_embeds")  # SD3 / Flux: concatenated or pooled encoder outputs


def _budget(gate, own: LayerMetric, dtype: str) -> tuple:
    """The low-precision budget from PyTorch's own statistic; ``None`` when that statistic is not finite."""
    if not (np.isfinite(own.rel_err) and np.isfinite(own.rms_rel)) or "finite" in own.failed:
        return None, {}
    src = {}
    if gate.rel_source == "table":
        gate = replace(gate, rel=max(gate.rel, LOW_PRECISION_FACTOR * own.rel_err))
        src["rel_source"] = f"budget max(row, {LOW_PRECISION_FACTOR:g} x pytorch {dtype.lower()} error)"
    if gate.rms is not None and gate.rms_source == "table":
        gate = replace(gate, rms=max(gate.rms, LOW_PRECISION_FACTOR * own.rms_rel))
        src["rms_source"] = f"budget max(row, {LOW_PRECISION_FACTOR:g} x pytorch {dtype.lower()} rms error)"
    if gate.mismatch_source == "table":
        gate = replace(gate, mismatch=max(gate.mismatch, LOW_PRECISION_FACTOR * own.mismatch_fraction))
        src["mismatch_source"] = f"budget max(row, {LOW_PRECISION_FACTOR:g} x pytorch {dtype.lower()} mismatch)"
    return gate, src


def _nonfinite(a: Aligned, ref: np.ndarray, gate, dtype: str, kind: str, side: str) -> LayerMetric:
    m = compare_arrays(a, ref, ref, gate, dtype)
    m.kind, m.passed, m.failed = kind, False, ("ref-finite",)
    m.note = f"{side} went non-finite here: no budget can be derived from it, the layer fails"
    return m


class Judge:
    """The verdict of one MindSpore capture against PyTorch's fp32 one (and PyTorch's own low-precision run)."""

    def __init__(self, *, backend: str, dtype: str, overrides: dict | None = None,
                 mismatch_overrides: dict | None = None, rms_overrides: dict | None = None):
        self.backend, self.dtype = backend, dtype
        self.overrides, self.mismatch_overrides = overrides or {}, mismatch_overrides or {}
        self.rms_overrides = rms_overrides or {}

    def gate(self, kind: str, a: Aligned):
        return point_gate(self.dtype, self.backend, kind, a.component, a.diffusers, overrides=self.overrides,
                          mismatch_overrides=self.mismatch_overrides, rms_overrides=self.rms_overrides)

    def _one(self, a: Aligned, kind: str, ms: np.ndarray, ref: np.ndarray, low: np.ndarray | None) -> LayerMetric:
        gate = self.gate(kind, a)
        if low is None:
            m = compare_arrays(a, ms, ref, gate, self.dtype)
        else:
            if not np.isfinite(np.asarray(ref, np.float64)).all():
                return _nonfinite(a, ref, gate, self.dtype, kind, "PyTorch's fp32 reference")
            own = compare_arrays(a, low, ref, gate, self.dtype)
            budget, src = _budget(gate, own, self.dtype)
            if budget is None:
                return _nonfinite(a, ref, gate, self.dtype, kind, f"PyTorch's own {self.dtype.lower()} run")
            m = compare_arrays(a, ms, ref, budget, self.dtype, **src)
            m.ref_rel_err, m.ref_mismatch_fraction = own.rel_err, own.mismatch_fraction
        m.kind = kind
        return m

    def judge(self, alignment: list[Aligned], ms: dict, pt: dict, pt_low: dict | None = None,
              targets: set[str] | frozenset = frozenset()) -> ParityReport:
        """``targets``: aligned SGM block names (no timestep suffix) that hold a module of the LoRA file."""
        report = ParityReport()
        replayed = any(k.startswith(LOCAL) for k in ms)
        chained = any(not k.startswith((LOCAL, NOLORA, "_inputs.")) for k in ms)
        for a in alignment:
            low = pt_low.get(a.diffusers) if pt_low is not None else None
            if chained:
                if a.sgm not in ms or a.diffusers not in pt or (pt_low is not None and low is None):
                    report.missing.append(a.sgm if a.sgm not in ms else a.diffusers)
                else:
                    report.layers.append(self._one(a, "chained", ms[a.sgm], pt[a.diffusers], low))
            if replayed and a.sgm not in NOT_REPLAYED and a.diffusers in pt:
                got = ms.get(LOCAL + a.sgm)
                low_local = pt_low.get(LOCAL + a.diffusers) if pt_low is not None else None
                if got is None or (pt_low is not None and low_local is None):
                    report.missing.append(LOCAL + a.sgm)
                else:
                    report.layers.append(self._one(a, "local", got, pt[a.diffusers], low_local))
            if replayed and a.sgm.split("@t")[0] in targets:
                report.layers.append(self._effect(a, ms, pt, pt_low))
        report.meta["judged"] = {"chained": chained, "replayed": replayed, "lora_blocks": len(targets)}
        return report

    def _effect(self, a: Aligned, ms: dict, pt: dict, pt_low: dict | None) -> LayerMetric:
        keys = ((ms, LOCAL + a.sgm), (ms, NOLORA + a.sgm), (pt, LOCAL + a.diffusers), (pt, NOLORA + a.diffusers))
        gate = self.gate("effect", a)
        absent = [k for d, k in keys if k not in d]
        if absent:
            m = compare_arrays(a, np.zeros(1), np.zeros(1), gate, self.dtype)
            m.kind, m.passed, m.failed = "effect", False, ("missing",)
            m.note = f"the LoRA's effect cannot be measured: {', '.join(absent)} not captured"
            return m
        e_ms = np.asarray(ms[LOCAL + a.sgm], np.float64) - ms[NOLORA + a.sgm]
        e_pt = np.asarray(pt[LOCAL + a.diffusers], np.float64) - pt[NOLORA + a.diffusers]
        if pt_low is not None and LOCAL + a.diffusers in pt_low and NOLORA + a.diffusers in pt_low:
            e_low = np.asarray(pt_low[LOCAL + a.diffusers], np.float64) - pt_low[NOLORA + a.diffusers]
            m = self._one(a, "effect", e_ms, e_pt, e_low)
        else:
            m = compare_arrays(a, e_ms, e_pt, gate, self.dtype)
            m.kind = "effect"
        size_pt = float(np.abs(e_pt).max(initial=0.0)) if e_pt.size else 0.0
        size_ms = float(np.abs(e_ms).max(initial=0.0)) if e_ms.size and np.isfinite(e_ms).all() else float("nan")
        m.effect_size, m.effect_size_ms = size_pt, size_ms
        dead = [side for side, size in (("PyTorch", size_pt), ("MindSpore", size_ms)) if size == 0.0]
        if dead and "shape" not in m.failed:
            m.passed, m.failed = False, m.failed + ("noop",)
            m.note = (f"the LoRA targets this block but changes nothing on the {' and '.join(dead)} side "
                      f"(effect exactly 0; the other side's effect max {max(size_pt, size_ms if size_ms == size_ms else 0):.3g}):"
                      f" its LoRA did not load or is not applied")
        return m
