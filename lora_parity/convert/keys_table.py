"""The mapping table behind ``lora-parity keys`` (successor of the old param-list files)."""
from __future__ import annotations

from pathlib import Path

from lora_parity.convert.converter import default_format, load_lora
from lora_parity.convert.formats import ms_style, pair_tensors
from lora_parity.convert.layout import load_layout


def keys_table(src: Path, *, layout: str | None = None, fmt: str | None = None,
               strict: bool = True) -> list[tuple[str, str, str]]:
    """Rows (source key, target key, shape) in architecture order.

    A fused OpenCLIP ``in_proj`` source key maps to three target keys; a kohya
    ``.alpha`` has no source tensor (alpha comes from ``--alpha`` or the rank).
    """
    lora = load_lora(src, layout=load_layout(layout) if layout else None, strict=strict)
    dst_fmt = fmt or default_format(lora, lora.source_format == "ms")
    te, style, spelling = lora.keymap.te_kohya, lora.keymap.kohya_unet_style, ms_style(lora)
    rows = []
    for p in lora.ordered():
        src_by_role: dict[str, list[str]] = {}
        for k, _, role in pair_tensors(p, lora.source_format, te, style, ms_spelling=spelling):
            src_by_role.setdefault(role, []).append(k)
        counts: dict[str, int] = {}
        for k, t, role in pair_tensors(p, dst_fmt, te, style, ms_spelling=spelling):
            cands = src_by_role.get(role) or ["(alpha)"]
            i = counts.get(role, 0)
            counts[role] = i + 1
            rows.append((cands[min(i, len(cands) - 1)], k, "x".join(map(str, t.shape)) or "scalar"))
    return rows
