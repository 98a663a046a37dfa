"""Faults confined to a small region of one layer (one attention head, one GroupNorm group), planted in a
LoRA, for the element-wise mismatch gate (tests/test_gates.py).  No assertions of their own."""
from __future__ import annotations

import numpy as np

from lora_parity.convert.lora_set import LoraPair, LoraSet
from lora_parity.convert.tensor import Tensor


def _with(lora: LoraSet, updates: dict[str, LoraPair]) -> LoraSet:
    assert set(updates) <= set(lora.pairs), sorted(set(updates) - set(lora.pairs))
    return LoraSet({**lora.pairs, **updates}, lora.layout, lora.layout_note, lora.source_format)


def _b(pair: LoraPair) -> np.ndarray:
    return pair.B.to_float("float32").copy()


def _replace_b(pair: LoraPair, b: np.ndarray) -> LoraPair:
    return LoraPair(pair.module, pair.A, Tensor.from_numpy(np.ascontiguousarray(b.astype(np.float32))), pair.alpha)


def swap_head_qk(lora: LoraSet, attn: str, head: int, head_channels: int) -> LoraSet:
    """The lora_B rows of one attention head exchanged between ``attn.to_q`` and ``attn.to_k``
    (every other head, and every other module, untouched)."""
    q, k = lora.pairs[attn + ".to_q"], lora.pairs[attn + ".to_k"]
    rows = slice(head * head_channels, (head + 1) * head_channels)
    bq, bk = _b(q), _b(k)
    bq[rows], bk[rows] = bk[rows].copy(), bq[rows].copy()
    return _with(lora, {attn + ".to_q": _replace_b(q, bq), attn + ".to_k": _replace_b(k, bk)})


def scale_group(lora: LoraSet, conv: str, group: int, group_channels: int, factor: float) -> LoraSet:
    """The lora_B rows (output channels) of one GroupNorm group of one conv scaled by ``factor``."""
    p = lora.pairs[conv]
    b = _b(p)
    b[group * group_channels:(group + 1) * group_channels] *= factor
    return _with(lora, {conv: _replace_b(p, b)})


def scale_all_b(lora: LoraSet, factor: float) -> LoraSet:
    """Every lora_B scaled: the same as alpha off by ``factor`` (alpha itself kept in the header)."""
    return _with(lora, {k: _replace_b(p, _b(p) * factor) for k, p in lora.pairs.items()})
