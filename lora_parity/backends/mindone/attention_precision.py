"""Where mindone.diffusers computes attention in float16 although the pipeline runs in float32.

Two paths, read from mindone 0.5.0 (facts; see docs/comparing.md):

* ``Attention.scaled_dot_product_attention`` (SD / SDXL / SD3 processors): with ``fa_op_available``
  (MindSpore >= 2.3 on Ascend) and flash enabled, float32 query / key / value are cast to
  ``fa_force_dtype`` (float16 by default) for ``FlashAttentionScore``.  On CPU the math path runs.
* ``layers_compat.scaled_dot_product_attention`` (the attention dispatch Flux's processors call):
  casts float32 inputs to float16 and runs ``FlashAttentionScore`` on every device, its math
  branch computed and then overwritten.

A float32 comparison of such a run against PyTorch's float32 judges the attention's float16
rounding, not the LoRA; the capture records each path as reduced float32 precision (the
environment check then refuses the fp32 comparison unless ``--allow-env-drift``).  The second
path is measured, not assumed: the function runs once on float32 inputs and is compared with a
float64 evaluation of attention.
"""
from __future__ import annotations

import numpy as np

#: relative error of float32 attention on the probe (float32 rounding is ~1e-7; float16 ~5e-4)
FLOAT32_ATTENTION_REL = 1e-5


def _probe_dispatch() -> float:
    """Max relative error of ``layers_compat.scaled_dot_product_attention`` on float32 inputs."""
    import mindspore as ms
    from mindone.diffusers.models import layers_compat

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 8, 16)).astype(np.float32) for _ in range(3))
    out = layers_compat.scaled_dot_product_attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v))
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(16.0)
    w = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhqk,bhkd->bhqd", w / w.sum(-1, keepdims=True), v.astype(np.float64))
    return float(np.abs(out.astype(ms.float32).asnumpy() - ref).max() / np.abs(ref).max())


def _uses_dispatch(model) -> bool:
    procs = getattr(model, "attn_processors", None) or {}
    return any(type(p).__name__.startswith("Flux") for p in procs.values())


def reduced_attention(dtype: str, **models) -> list[str]:
    """One phrase per float16 attention path the given models take in a ``dtype`` run (float32 only)."""
    if dtype != "F32":
        return []
    out = []
    for name, model in models.items():
        if model is None:
            continue
        cells = [c for _, c in model.cells_and_names() if hasattr(c, "fa_op_available")]
        if any(c.fa_op_available and getattr(c, "_enable_flash_sdp", False)
               and str(getattr(c, "fa_force_dtype", "")).lower() in ("float16", "bfloat16") for c in cells):
            out.append(f"{name}: Attention.scaled_dot_product_attention casts float32 to float16 for "
                       f"FlashAttentionScore (fa_force_dtype)")
        if _uses_dispatch(model):
            rel = _probe_dispatch()
            if rel > FLOAT32_ATTENTION_REL:
                out.append(f"{name}: mindone's attention dispatch (layers_compat.scaled_dot_product_attention) "
                           f"runs FlashAttentionScore on float16-cast inputs (float32 probe: rel error {rel:.1e})")
    return out
