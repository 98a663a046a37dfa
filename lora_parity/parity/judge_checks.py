"""The judge's checks that belong to no single layer: each closes a way a run could pass unjudged.

* ``--steps N`` asked and a capture holds no image: the images were part of the question, so
  the answer cannot be "layers agree" alone (:func:`missing_image_result`).
* Non-finite pixels: ``to_uint8`` turns NaN into 0 on both sides, and two NaN images then
  "agree" exactly; the float images are checked before conversion (:func:`nonfinite_pixels`).
* No aligned layer at all: every gate passes vacuously over an empty list (:data:`NO_LAYERS`).

Pure functions over arrays and dicts (no framework), used by :func:`lora_parity.compare.judge`.
"""
from __future__ import annotations

import numpy as np

NO_LAYERS = ("no aligned layer was compared: the captures hold none of the activations the alignment names "
             "(wrong naming, or a capture made without activations)")


def sides_without_image(steps: int | None, images: dict[str, dict]) -> list[str]:
    """The sides (by label) that hold no ``"image"`` although ``steps`` were asked; [] when none were asked."""
    if steps is None:
        return []
    return [label for label, held in images.items() if "image" not in held]


def missing_image_result(lacking: list[str], *, steps: int, guidance: float, dtype: str, gate: dict,
                         seconds_per_step: dict) -> dict:
    """``report.image`` for a run that asked for images and did not get them all: failed, saying which side
    has none.  The metric fields are present (None) so report.json keeps its shape."""
    reason = f"--steps {steps} asked, but the {' and the '.join(lacking)} capture holds no image"
    return {"mae": None, "max_error": None, "psnr": None, "ssim": None, "shape": [],
            "mae_threshold": gate["mae"], "max_error_threshold": gate["max_error"], "gate": gate, "passed": False,
            "reason": reason, "steps": steps, "guidance": guidance, "dtype": dtype, "reference": "pytorch fp32",
            "seconds_per_step": seconds_per_step, "title": reason}


def nonfinite_pixels(images: dict[str, np.ndarray]) -> dict[str, int]:
    """label -> number of NaN / Inf values, for each float image that has any."""
    out = {}
    for label, img in images.items():
        bad = int(np.size(img) - np.count_nonzero(np.isfinite(np.asarray(img, dtype=np.float64))))
        if bad:
            out[label] = bad
    return out


def nonfinite_reason(counts: dict[str, int], sizes: dict[str, int]) -> str:
    """One line naming each side whose image is not finite."""
    parts = [f"the {label} image has {n} of {sizes[label]} values NaN/Inf" for label, n in counts.items()]
    return "non-finite pixels: " + "; ".join(parts)


def aesthetic_meta(aesthetic) -> dict:
    """The refiner's aesthetic conditioning a run used (None for a base model, which has none)."""
    if aesthetic is None:
        return {"aesthetic_score": None, "negative_aesthetic_score": None}
    return {"aesthetic_score": float(aesthetic[0]), "negative_aesthetic_score": float(aesthetic[1])}
