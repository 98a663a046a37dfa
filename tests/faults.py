"""Realistic faults, applied to a LoRA or to base weights, to show each check can fail."""
from __future__ import annotations

import numpy as np

from lora_parity.lora_set import LoraPair, LoraSet


def swap_projections(lora: LoraSet, block: str | None = None) -> LoraSet:
    """attn1.to_q and to_k tensors exchanged in one transformer block (shapes equal, names right)."""
    q = next(k for k, p in lora.pairs.items() if k.endswith("attn1.to_q") and (block is None or p.module.block == block))
    k = q[:-len("to_q")] + "to_k"
    pairs = dict(lora.pairs)
    pairs[q] = LoraPair(lora.pairs[q].module, lora.pairs[k].A, lora.pairs[k].B, lora.pairs[k].alpha)
    pairs[k] = LoraPair(lora.pairs[k].module, lora.pairs[q].A, lora.pairs[q].B, lora.pairs[q].alpha)
    return LoraSet(pairs, lora.layout, lora.layout_note, lora.source_format)


def drop_block(lora: LoraSet, block: str) -> LoraSet:
    pairs = {k: p for k, p in lora.pairs.items() if p.module.block != block}
    assert len(pairs) < len(lora.pairs), f"no LoRA in {block}"
    return LoraSet(pairs, lora.layout, lora.layout_note, lora.source_format)


def wrong_scale(lora: LoraSet, factor: float = 2.0) -> LoraSet:
    pairs = {k: LoraPair(p.module, p.A, p.B, p.alpha * factor) for k, p in lora.pairs.items()}
    return LoraSet(pairs, lora.layout, lora.layout_note, lora.source_format)


def untransposed_text_projection(sgm: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    out = dict(sgm)
    out[prefix + "text_projection"] = np.ascontiguousarray(sgm[prefix + "text_projection"].T)
    return out


def qkv_wrong_order(sgm: dict[str, np.ndarray], prefix: str, layer: int = 0) -> dict[str, np.ndarray]:
    """in_proj built as [k; q; v] instead of [q; k; v]."""
    out = dict(sgm)
    for suffix in ("in_proj_weight", "in_proj_bias"):
        key = f"{prefix}transformer.resblocks.{layer}.attn.{suffix}"
        q, k, v = np.split(sgm[key], 3, axis=0)
        out[key] = np.concatenate([k, q, v], axis=0)
    return out
