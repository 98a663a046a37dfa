"""The one tolerance table. Tests and CI gates read thresholds from here only.

Per dtype, the bound on a layer's relative error ``max|a-b| / max|ref|`` between
the two frameworks.  fp32 is tight (both run the same math in IEEE single);
fp16/bf16 are error *budgets* judged against the fp32 reference, sized from the
unit roundoff of the format times an accumulation allowance, not loosened
literals copied from elsewhere.  Each may be overridden from the command line
(``--tol-<dtype>``, ``--image-mae``) so CI can gate on its own numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Tolerance:
    """``rel``: max |a - b| / max |ref| per layer; ``mismatch_atol``/``rtol`` for the element count."""

    rel: float
    rtol: float
    atol: float


# unit roundoff u = 2^-p; budgets are a multiple of u (for deep networks error grows with depth)
_U = {"F32": 2.0 ** -24, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}

LAYER: dict[str, Tolerance] = {
    "F32": Tolerance(rel=1e-5, rtol=1e-4, atol=1e-5),
    # floors of the low-precision budgets (see LOW_PRECISION_FACTOR): a few units of roundoff
    "F16": Tolerance(rel=4 * _U["F16"], rtol=4 * _U["F16"], atol=1e-3),
    "BF16": Tolerance(rel=4 * _U["BF16"], rtol=4 * _U["BF16"], atol=1e-2),
}

# fp16/bf16 runs are judged against the fp32 reference: MindSpore's low-precision error on a layer
# may be at most this multiple of PyTorch's own low-precision error on it (floored by LAYER[dtype].rel).
LOW_PRECISION_FACTOR = 4.0

# Conversion must be exact: bitwise tensors, and merged deltas equal in float64.
CONVERSION_DELTA = Tolerance(rel=0.0, rtol=0.0, atol=0.0)

# Full-image thresholds on 0..255 pixels (the user's bar is MAE < 5).
IMAGE_MAE_MAX = 5.0
IMAGE_MAE_FP32_TARGET = 0.5
# LoRA off vs on must differ by at least this many times the MAE threshold.
LORA_EFFECT_FACTOR = 4.0
# A parity fault must push a layer past its tolerance by at least this factor.
FAULT_FACTOR = 10.0


def layer_tolerance(dtype: str, overrides: dict[str, float] | None = None) -> Tolerance:
    """Tolerance for ``dtype`` ('F32', 'F16', 'BF16'), with an optional ``rel`` override."""
    tol = LAYER[dtype]
    if overrides and dtype in overrides and overrides[dtype] is not None:
        tol = replace(tol, rel=float(overrides[dtype]))
    return tol

# Two code paths within one framework (e.g. hook capture vs direct call, im2col vs native conv):
# only float32 reassociation separates them.
SAME_FRAMEWORK = Tolerance(rel=1e-6, rtol=1e-6, atol=1e-6)
# A LoRA that is applied must move an activation by more than this (absolute, float32 scale ~1).
LORA_EFFECT_MIN_ABS = 1e-4

# Random full-depth weights must keep every compared activation alive: the reference's max |value|
# per layer at least this (finite is checked too).  Far below real activations (order 1).
LAYER_ACTIVITY_MIN = 1e-3
