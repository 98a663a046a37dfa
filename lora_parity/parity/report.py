"""Report files: report.json plus PNGs (images side by side, difference heatmap, error vs depth).

matplotlib runs headless (Agg); nothing here computes metrics, it only draws them.

report.json is strict JSON (RFC 8259): Python's default ``json.dumps`` writes ``Infinity`` /
``NaN``, which ``jq``, JavaScript's ``JSON.parse`` and most other parsers reject, and identical
images have an infinite PSNR.  A non-finite number is therefore written as ``null`` with a
boolean flag beside it (``"psnr": null, "psnr_infinite": true``; ``_neg_infinite``, ``_nan``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lora_parity.parity.metrics import ParityReport


def save_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def side_by_side(path: Path, ms_image: np.ndarray, pt_image: np.ndarray, title: str = "") -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, img, name in zip(axes, (ms_image, pt_image), ("MindSpore", "PyTorch (diffusers)")):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def diff_heatmap(path: Path, ms_image: np.ndarray, pt_image: np.ndarray) -> Path:
    plt = _pyplot()
    diff = np.abs(ms_image.astype(np.int16) - pt_image.astype(np.int16)).max(axis=-1)
    fig, ax = plt.subplots(figsize=(4.8, 4))
    im = ax.imshow(diff, cmap="inferno", vmin=0, vmax=max(1, int(diff.max())), interpolation="nearest")
    ax.set_title(f"|MindSpore - PyTorch| per pixel (max over RGB), max {int(diff.max())}")
    ax.axis("off")
    fig.colorbar(im, ax=ax, label="0-255")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def layer_error_plot(path: Path, report: ParityReport) -> Path:
    """Relative error against depth, one line per component, tolerance dashed."""
    plt = _pyplot()
    comps = list(dict.fromkeys(m.component for m in report.layers))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for comp in comps:
        ms = report.by_component(comp)
        errs = [max(m.rel_err, 1e-12) for m in ms]
        ax.plot(range(len(ms)), errs, marker="o", label=comp)
    if report.layers:
        ax.axhline(report.layers[0].tol_rel, linestyle="--", color="grey", label="tolerance")
    ax.set_yscale("log")
    ax.set_xlabel("depth (layer index within the component, forward order)")
    ax.set_ylabel("max|ms - pt| / max|pt|")
    ax.set_title("Per-layer error, MindSpore vs PyTorch")
    if comps:  # an empty legend is a matplotlib warning on stderr
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(folder: Path, report: ParityReport, images: dict | None = None) -> dict[str, Path]:
    """report.json (+ PNGs); ``images``: {'ms': uint8, 'pt': uint8} when images were generated."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"json": folder / "report.json"}
    out["layer_errors"] = layer_error_plot(folder / "layer_errors.png", report)
    if images:
        out["ms_png"] = save_png(folder / "ms.png", images["ms"])
        out["pt_png"] = save_png(folder / "pt.png", images["pt"])
        out["side_by_side"] = side_by_side(folder / "side_by_side.png", images["ms"], images["pt"],
                                           (report.image or {}).get("title", ""))
        out["diff_heatmap"] = diff_heatmap(folder / "diff_heatmap.png", images["ms"], images["pt"])
    data = report.to_dict()
    data["files"] = {k: p.name for k, p in out.items()}
    out["json"].write_text(dumps_strict(data, indent=2) + "\n")
    return out


_NONFINITE_FLAG = {"inf": "infinite", "-inf": "neg_infinite", "nan": "nan"}


def _nonfinite_kind(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def strict_jsonable(obj: Any) -> Any:
    """``obj`` with every non-finite number replaced by None, numpy values made plain Python.

    A dict entry ``k`` that was non-finite gets a flag ``k_infinite`` / ``k_neg_infinite`` /
    ``k_nan`` (true) beside it, so the information is kept; a non-finite list element becomes
    None and its list's key gets ``k_nonfinite``: {index: "inf" | "-inf" | "nan"}.  Anything
    else that is not JSON-native goes through ``float()``, as report.json always did.
    """
    if isinstance(obj, dict):
        out: dict = {}
        for k, v in obj.items():
            key = str(k)
            out[key] = strict_jsonable(v)
            scalar = _plain(v)
            if isinstance(scalar, float) and not math.isfinite(scalar):
                out[f"{key}_{_NONFINITE_FLAG[_nonfinite_kind(scalar)]}"] = True
            elif isinstance(v, (list, tuple, np.ndarray)):
                bad = {str(i): _nonfinite_kind(x) for i, x in enumerate(map(_plain, _items(v)))
                       if isinstance(x, float) and not math.isfinite(x)}
                if bad:
                    out[f"{key}_nonfinite"] = bad
        return out
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [strict_jsonable(v) for v in _items(obj)]
    value = _plain(obj)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _items(seq) -> list:
    return seq.tolist() if isinstance(seq, np.ndarray) else list(seq)


def _plain(x: Any) -> Any:
    """A JSON-native scalar for ``x`` (containers are returned unchanged)."""
    if x is None or isinstance(x, (bool, str, dict, list, tuple, np.ndarray)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, Path):
        return str(x)
    return float(x)


def dumps_strict(data: Any, **kwargs) -> str:
    """``json.dumps`` that only ever writes strict JSON (non-finite numbers as null + flag)."""
    return json.dumps(strict_jsonable(data), allow_nan=False, **kwargs)
