"""Generated LoRAs (no downloads): what MindONE would write, with chosen rank/alpha/modules.

Used by the demo, tests and benchmarks.  lora_B is non-zero on purpose (a
freshly initialised LoRA has B = 0 and would make every parity check trivial).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .keymap import KeyMap, ModuleEntry, keymap_for
from .layout import ModelLayout
from .lora_set import LoraPair, LoraSet
from .tensor import Tensor

MODULE_SETS = ("attention", "linear", "unet", "all")


def select_modules(km: KeyMap, which: str | Iterable[str]) -> list[ModuleEntry]:
    """'attention' (MindONE's default), 'linear' (every Dense), 'unet' (every LoRA-able UNet module),
    'all' (+ text encoders, convs included)."""
    if which == "attention":
        return km.attention_entries()
    if which == "linear":  # every Dense (UNet + text encoders): what MindONE's LoRA layer can wrap
        return [e for e in km.lora_entries() if e.kind == "linear"]
    if which == "unet":
        return km.lora_entries("unet")
    if which == "all":
        return km.lora_entries()
    names = set(which)
    return [e for e in km.lora_entries() if e.sgm in names]


def make_lora(layout: ModelLayout, *, rank: int = 4, alpha: float | None = None,
              modules: str | Iterable[str] = "attention", dtype: str = "F32", seed: int = 0,
              b_std: float = 0.05) -> LoraSet:
    km = keymap_for(layout)
    rng = np.random.default_rng(seed)
    pairs = {}
    for e in select_modules(km, modules):
        sa, sb = e.lora_shapes(rank)
        fan_in = int(np.prod(sa[1:]))
        a = rng.standard_normal(sa, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        b = rng.standard_normal(sb, dtype=np.float32) * np.float32(b_std)
        pairs[e.sgm] = LoraPair(e, Tensor.from_numpy(a, dtype), Tensor.from_numpy(b, dtype),
                                float(rank if alpha is None else alpha))
    return LoraSet(pairs, layout, f"layout '{layout.name}' (generated)", "ms")


def training_extras(lora: LoraSet, *, optimizer: bool = True) -> dict[str, Tensor]:
    """Non-LoRA entries a MindSpore training checkpoint carries next to the LoRA."""
    extras = {
        "epoch_num": Tensor.from_numpy(np.array(3, dtype=np.int32)),
        "step_num": Tensor.from_numpy(np.array(1200, dtype=np.int32)),
        "global_step": Tensor.from_numpy(np.array([1200], dtype=np.int32)),
        "learning_rate": Tensor.from_numpy(np.array(1e-4, dtype=np.float32)),
    }
    if optimizer:
        for p in lora.ordered()[:2]:
            extras[f"adam_m.{p.module.sgm}.lora_A.weight"] = Tensor.from_numpy(np.zeros(p.A.shape, np.float32))
            extras[f"adam_v.{p.module.sgm}.lora_A.weight"] = Tensor.from_numpy(np.zeros(p.A.shape, np.float32))
    return extras


def write_ms_lora(path: Path, lora: LoraSet, *, extras: dict[str, Tensor] | None = None,
                  interleave: bool = True) -> Path:
    """Write as MindONE does: ``.ckpt`` with lora_A/lora_B per module (plus optional extras)."""
    from . import ckpt_io
    from .formats import tensors_for

    tensors, _ = tensors_for(lora, "ms")
    if not interleave:  # all A first, then all B: order must never matter
        tensors = dict(sorted(tensors.items(), key=lambda kv: kv[0].endswith("lora_B.weight")))
    if extras:
        tensors = {**tensors, **extras}
    ckpt_io.write_ckpt(path, tensors)
    return path
