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


def write_fullsize_lora(layout, path, *, rank: int = 4, alpha: float = 8.0, seed: int = 1, b_std: float = 0.1):
    """What MindONE trains at full size: q/k/v/out of all UNet attention modules, plus the text
    encoders' attention (CLIP-L q/k/v/out, bigG in_proj/out_proj), alpha != rank."""
    from lora_parity.keymap import keymap_for
    from lora_parity.synthetic import make_lora, write_ms_lora

    km = keymap_for(layout)
    modules = [e.sgm for e in km.attention_entries()]
    modules += [e.sgm for e in km.lora_entries() if e.component.startswith("text_encoder") and e.kind == "linear"
                and "attn" in e.sgm]
    lora = make_lora(layout, rank=rank, alpha=alpha, modules=modules, seed=seed, b_std=b_std)
    write_ms_lora(path, lora)
    return lora


def plant_keymap_swap(monkeypatch, layout, sgm_a: str, sgm_b: str) -> None:
    """A key map whose entries for two modules point at each other's diffusers names: the converter
    then writes their LoRA crosswise (shapes equal, every key mapped, nothing reported)."""
    from dataclasses import replace

    from lora_parity import keymap

    km = keymap.KeyMap(layout)
    by = {e.sgm: e for e in km.entries}
    a, b = by[sgm_a], by[sgm_b]
    swapped = {sgm_a: replace(a, diffusers=b.diffusers), sgm_b: replace(b, diffusers=a.diffusers)}
    km.entries = tuple(swapped.get(e.sgm, e) for e in km.entries)
    monkeypatch.setitem(keymap._CACHE, layout, km)


def keymap_entries(layout):
    from lora_parity.keymap import keymap_for

    return keymap_for(layout).entries
