"""Reading sd-scripts' Flux LoRA (``networks.lora_flux``), which names modules as Black Forest Labs' own Flux
code does (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``, ...).

BFL fuses what diffusers keeps apart: a double block's q/k/v (image and text side) and a single block's
q/k/v plus MLP input (``linear1``).  A LoRA on a fused Linear is one ``lora_down`` feeding all row blocks of
``lora_up``, so it is exactly one LoRA per diffusers module with that ``lora_down`` shared as each ``lora_A`` and
``lora_up`` split by rows -- the same rank and alpha, no value changed.  BFL's final modulation emits
(shift, scale) where diffusers' ``norm_out`` emits (scale, shift): its ``lora_up`` halves swap.  Facts from
diffusers' ``_convert_kohya_flux_lora_to_diffusers`` (the module correspondence) and BFL's layer widths; the
parts come back as ``lora_transformer_`` names, which the key map reads.  Writing BFL names is not offered.
"""
from __future__ import annotations

import re

import numpy as np

from lora_parity.convert.tensor import Tensor
from lora_parity.errors import KeyMapError

#: BFL module (without ``lora_unet_``) -> diffusers transformer modules, in lora_up row order; "{i}" = block
_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # rows: h, h, h, then the MLP width
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",  # (shift, scale) -> diffusers' (scale, shift)
}
_SWAP_HALVES = "final_layer_adaLN_modulation_1"
_BLOCK = re.compile(r"^lora_unet_(?P<kind>double|single)_blocks_(?P<i>\d+)_(?P<mod>.+)$")
PREFIX = "lora_unet_"
KOHYA_TRANSFORMER = "lora_transformer_"


def is_bfl(modules) -> bool:
    """A kohya LoRA in BFL names: it has double / single blocks under ``lora_unet_``."""
    return any(_BLOCK.match(m) for m in modules)


def _targets(module: str) -> tuple[tuple[str, ...], str] | None:
    """(diffusers paths, BFL module) of one ``lora_unet_`` module name, or None if BFL has no such module."""
    m = _BLOCK.match(module)
    if m:
        table = _DOUBLE if m.group("kind") == "double" else _SINGLE
        paths = table.get(m.group("mod"))
        if paths is None:
            return None
        block = "transformer_blocks" if m.group("kind") == "double" else "single_transformer_blocks"
        return tuple(f"{block}.{m.group('i')}.{p}" for p in paths), m.group("mod")
    top = _TOP.get(module[len(PREFIX):])
    return ((top,), module[len(PREFIX):]) if top else None


def _row_splits(mod: str, a: Tensor, b: Tensor, n: int) -> list[int] | None:
    """Row counts per part: q/k/v equal thirds; ``linear1`` three hidden-size blocks (the layer's input width,
    ``lora_down``'s columns) then the MLP."""
    rows = b.shape[0]
    if mod == "linear1":
        h = a.shape[1]
        return [h, h, h, rows - 3 * h] if rows > 3 * h else None
    return [rows // n] * n if rows % n == 0 else None


def split_bfl(halves) -> None:
    """Rewrite a parsed kohya file's BFL-named modules (``NamedHalves``) in place as ``lora_transformer_`` parts;
    text-encoder modules and anything BFL does not name are left for the key map to judge."""
    modules, keys, alphas = {}, {}, {}
    split = 0
    for mod, parts in halves.modules.items():
        hit = _targets(mod) if mod.startswith(PREFIX) else None
        if hit is None:
            modules[mod], keys[mod] = parts, halves.keys[mod]
            if mod in halves.alpha_overrides:
                alphas[mod] = halves.alpha_overrides[mod]
            continue
        paths, bfl = hit
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None:  # leave the missing-half error to the resolver, under the original name
            modules[mod], keys[mod] = parts, halves.keys[mod]
            continue
        if len(b.shape) != 2:
            raise KeyMapError(f"BFL module {bfl} is a Linear; lora_up has shape {list(b.shape)}",
                              path=halves.path, key=halves.keys[mod]["B"])
        rows = _row_splits(bfl, a, b, len(paths))
        if rows is None:
            raise KeyMapError(f"lora_up rows {b.shape[0]} do not split into {', '.join(paths)}",
                              path=halves.path, key=halves.keys[mod]["B"])
        data = b.data
        if bfl == _SWAP_HALVES:
            half = data.shape[0] // 2
            data = np.concatenate([data[half:], data[:half]], axis=0)
        start = 0
        for path, n in zip(paths, rows):
            name = KOHYA_TRANSFORMER + path.replace(".", "_")
            modules[name] = {"A": a, "B": Tensor(b.dtype, np.ascontiguousarray(data[start:start + n]))}
            keys[name] = halves.keys[mod]
            if mod in halves.alpha_overrides:
                alphas[name] = halves.alpha_overrides[mod]
            start += n
        split += len(paths) > 1 or bfl == _SWAP_HALVES
    halves.modules, halves.keys, halves.alpha_overrides = modules, keys, alphas
    halves.notes.append(f"sd-scripts' Flux (BFL) names: {split} fused or reordered module(s) read as diffusers' "
                        f"separate ones (lora_down shared, lora_up split by rows; no value changed)")
