"""Realistic faults, applied to a LoRA or to base weights, to show each check can fail."""
from __future__ import annotations

import numpy as np

from lora_parity.convert.lora_set import LoraPair, LoraSet


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
    from lora_parity.convert.keymap import keymap_for
    from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

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

    from lora_parity.convert import keymap

    km = keymap.KeyMap(layout)
    by = {e.sgm: e for e in km.entries}
    a, b = by[sgm_a], by[sgm_b]
    swapped = {sgm_a: replace(a, diffusers=b.diffusers), sgm_b: replace(b, diffusers=a.diffusers)}
    km.entries = tuple(swapped.get(e.sgm, e) for e in km.entries)
    monkeypatch.setitem(keymap._CACHE, layout, km)


def keymap_entries(layout):
    from lora_parity.convert.keymap import keymap_for

    return keymap_for(layout).entries


# --------------------------------------------------------------------------------------------
# Converter faults planted in the process that converts (``compare``'s parent), for the fault
# tests of the default path and scripts/mutants.py.  Each takes a pytest ``MonkeyPatch``.

def plant_peft_alpha(monkeypatch, written, components=None) -> None:
    """The PEFT writer puts a wrong ``<component>.lora_alpha`` in the ``lora_adapter_metadata``
    header: ``written(r, alpha) -> alpha stored`` (e.g. ``lambda r, a: r``: alpha lost)."""
    from lora_parity.convert import formats

    metadata = formats._adapter_metadata

    def faulty(lora):
        meta = metadata(lora)
        for comp in {k.split(".", 1)[0] for k in meta}:
            if components is None or comp in components:
                meta[f"{comp}.lora_alpha"] = written(meta[f"{comp}.r"], meta[f"{comp}.lora_alpha"])
        return meta

    monkeypatch.setattr(formats, "_adapter_metadata", faulty)


def plant_writer_drop(monkeypatch, drop) -> None:
    """The PEFT / kohya writer leaves out every key for which ``drop(key)`` is true (a filter bug)."""
    from lora_parity.convert import formats

    tensors_for = formats.tensors_for

    def faulty(lora, fmt, **kw):
        tensors, meta = tensors_for(lora, fmt, **kw)
        if fmt != "ms":
            tensors = {k: t for k, t in tensors.items() if not drop(k)}
        return tensors, meta

    monkeypatch.setattr(formats, "tensors_for", faulty)


def plant_transposed_update(monkeypatch, sgm: str) -> None:
    """For one square module (in == out) the writer stores the transposed update
    ``(B A)^T = A^T B^T``: lora_A := B^T, lora_B := A^T.  Shapes fit exactly, so only values differ."""
    from lora_parity.convert import formats
    from lora_parity.convert.tensor import Tensor

    pair_tensors = formats.pair_tensors

    def faulty(p, fmt, *rest, **kw):
        if fmt != "ms" and p.module.sgm == sgm:
            assert p.module.in_features == p.module.out_features and p.module.kind == "linear", sgm
            a, b = p.A.to_float("float32"), p.B.to_float("float32")
            p = LoraPair(p.module, Tensor.from_numpy(np.ascontiguousarray(b.T)),
                         Tensor.from_numpy(np.ascontiguousarray(a.T)), p.alpha)
        return pair_tensors(p, fmt, *rest, **kw)

    monkeypatch.setattr(formats, "pair_tensors", faulty)


def plant_lora_a_layout_mixup(monkeypatch, component: str = "unet") -> None:
    """lora_A written as ``A.T.reshape(A.shape)`` (a MindSpore (in, out) layout mix-up that a
    reshape "fixes"), for the Linear modules of one component."""
    from lora_parity.convert import formats
    from lora_parity.convert.tensor import Tensor

    pair_tensors = formats.pair_tensors

    def faulty(p, fmt, *rest, **kw):
        if fmt != "ms" and p.module.component == component and p.module.kind == "linear":
            a = p.A.to_float("float32")
            p = LoraPair(p.module, Tensor.from_numpy(np.ascontiguousarray(a.T).reshape(a.shape)), p.B, p.alpha)
        return pair_tensors(p, fmt, *rest, **kw)

    monkeypatch.setattr(formats, "pair_tensors", faulty)


def plant_alpha_not_forwarded(monkeypatch) -> None:
    """``convert`` reads the MindONE .ckpt without the user's ``--alpha`` (alpha defaults to r)."""
    from lora_parity.convert import converter as convert

    load_lora = convert.load_lora

    def faulty(src, *, alpha=None, **kwargs):
        return load_lora(src, alpha=None, **kwargs)

    monkeypatch.setattr(convert, "load_lora", faulty)


def plant_fused_keymap_order(monkeypatch, layout, order=(1, 0, 2)) -> None:
    """The key map lists OpenCLIP's fused in_proj parts as k, q, v: the converter splits lora_B's
    rows into the wrong diffusers projections."""
    from dataclasses import replace

    from lora_parity.convert import keymap

    km = keymap.KeyMap(layout)
    km.entries = tuple(replace(e, diffusers=tuple(e.diffusers[i] for i in order)) if e.fused else e
                       for e in km.entries)
    monkeypatch.setitem(keymap._CACHE, layout, km)


def plant_keymap_block_swap(monkeypatch, layout, block_a: str, block_b: str) -> None:
    """Every module of SGM prefix ``block_a`` maps to the diffusers names of ``block_b`` and back
    (an index off by one in the generator between two same-shaped blocks)."""
    from dataclasses import replace

    from lora_parity.convert import keymap

    km = keymap.KeyMap(layout)
    by = {e.sgm: e for e in km.entries}

    def moved(e):
        for src, dst in ((block_a, block_b), (block_b, block_a)):
            if e.sgm.startswith(src):
                return replace(e, diffusers=by[dst + e.sgm[len(src):]].diffusers)
        return e

    km.entries = tuple(moved(e) for e in km.entries)
    monkeypatch.setitem(keymap._CACHE, layout, km)


def plant_kohya_name_swap(monkeypatch, layout, sgm_a: str, sgm_b: str) -> None:
    """The kohya writer names module ``sgm_a`` as ``sgm_b`` and back."""
    from lora_parity.convert import formats
    from lora_parity.convert.keymap import keymap_for

    by = keymap_for(layout).by_sgm
    kohya_name = formats.kohya_name
    other = {sgm_a: by[sgm_b], sgm_b: by[sgm_a]}

    def faulty(entry, part=0, **kw):
        return kohya_name(other.get(entry.sgm, entry), part, **kw)

    monkeypatch.setattr(formats, "kohya_name", faulty)


def plant_child_fault(monkeypatch, name: str) -> None:
    """Plant a MindSpore-port fault inside compare's side child (see tests/child_faults/)."""
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "child_faults"))
    monkeypatch.setenv("LORA_PARITY_TEST_FAULT", name)


# --------------------------------------------------------------------------------------------
# Faults in the judge's alignment (``lora_parity/parity/align.py``), planted in compare's parent
# (the process that judges).  A wrong alignment pairs activations that are not the same thing:
# compare must fail, never pass.

def _rebind(monkeypatch, module, name: str, replacement) -> None:
    """Replace ``module.name``, and every ``lora_parity`` module's own binding of the same object
    (``from ... import name`` made before the plant), for the duration of ``monkeypatch``."""
    import sys

    original = getattr(module, name)
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "lora_parity" or mod_name.startswith("lora_parity.")):
            continue
        if vars(mod).get(name) is original:
            monkeypatch.setattr(mod, name, replacement)


def plant_unet_alignment_swap(monkeypatch, sgm_a: str, sgm_b: str) -> None:
    """The UNet alignment pairs SGM blocks ``sgm_a`` and ``sgm_b`` with each other's diffusers module
    (two same-shaped points exchanged in the generated list)."""
    from dataclasses import replace

    from lora_parity.parity import align

    unet_alignment = align.unet_alignment

    def faulty(layout, timesteps=(None,)):
        points = unet_alignment(layout, timesteps)
        out = []
        for p in points:
            for src, dst in ((sgm_a, sgm_b), (sgm_b, sgm_a)):
                if p.sgm == src or p.sgm.startswith(src + "@"):
                    other = next(q for q in points if q.sgm == dst + p.sgm[len(src):])
                    p = replace(p, diffusers=other.diffusers)
                    break
            out.append(p)
        assert out != points, f"no UNet alignment point {sgm_a} / {sgm_b}"
        return out

    _rebind(monkeypatch, align, "unet_alignment", faulty)


def plant_text_alignment_off_by_one(monkeypatch, component: str) -> None:
    """The text alignment of ``component`` pairs layer i with ``hidden_states.i`` (the layer's input)
    instead of ``hidden_states.i + 1`` (its output): an index off by one."""
    import re
    from dataclasses import replace

    from lora_parity.parity import align

    text_alignment = align.text_alignment
    pattern = re.compile(rf"^{re.escape(component)}\.hidden_states\.(\d+)$")

    def faulty(layout):
        out = []
        for p in text_alignment(layout):
            m = pattern.match(p.diffusers)
            if m and int(m.group(1)) > 0:
                p = replace(p, diffusers=f"{component}.hidden_states.{int(m.group(1)) - 1}")
            out.append(p)
        return out

    _rebind(monkeypatch, align, "text_alignment", faulty)
