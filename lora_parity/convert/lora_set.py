"""The converter's one in-memory form of a LoRA: pairs keyed by SGM module name.

Every file format is parsed into *named* halves (A/B, down/up) first; this module
resolves those names through the key map, chooses or checks the layout, and
validates ranks, shapes and finiteness.  Fused OpenCLIP ``in_proj`` LoRAs are
kept fused here (as MindONE trains them) and split only by the PEFT/kohya writers.

A pair may carry a trained bias: the layer's whole bias as MindONE's
``lora_state_dict(bias="lora_only")`` saves it next to ``lora_A``/``lora_B``
(``<module>.bias``).  Only the MindONE format can hold it (see ``formats``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_parity.errors import KeyMapError, LoraParityError
from lora_parity.convert.keymap import KeyMap, ModuleEntry, keymap_for
from lora_parity.convert.detect import family_from_keys
from lora_parity.convert.layout import PRESETS, TRANSFORMER_FAMILIES, ModelLayout
from lora_parity.convert.tensor import FLOAT_DTYPES, Tensor


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: delta W = (alpha / rank) * B @ A."""

    module: ModuleEntry
    A: Tensor
    B: Tensor
    alpha: float
    bias: Tensor | None = None  # trained full bias (bias="lora_only"), replaces the base bias
    # a fused module built from separately trained q/k/v LoRAs (sd-scripts on bigG): the rank of each
    # stacked block of A, in part order (B is block-diagonal); None for a LoRA trained fused
    part_ranks: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> np.ndarray:
        """Merged weight delta in float64 (conv: (out, in, kh, kw))."""
        a = self.A.to_float().reshape(self.rank, -1)
        b = self.B.to_float().reshape(-1, self.rank)
        return (self.scale * (b @ a)).reshape(self.module.weight_shape())


@dataclass
class LoraSet:
    """A whole LoRA, validated against one layout."""

    pairs: dict[str, LoraPair]
    layout: ModelLayout
    layout_note: str
    source_format: str
    skipped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # kind -> skipped file keys
    notes: list[str] = field(default_factory=list)  # what was chosen (EMA set, trained biases)
    bias_keys: dict[str, str] = field(default_factory=dict)  # sgm module -> bias key as in the file
    metadata: dict[str, str] = field(default_factory=dict)  # kohya source's ss_* / modelspec.* header
    # "wrapped-model": taken from a whole PEFT-wrapped model checkpoint (mindone.diffusers checkpoint-N), a
    # MindSpore-side file although its names are diffusers'
    source_kind: str = ""

    @property
    def keymap(self) -> KeyMap:
        return keymap_for(self.layout)

    def ordered(self) -> list[LoraPair]:
        """Pairs in architecture order, so outputs never depend on input order."""
        return [self.pairs[e.sgm] for e in self.keymap.entries if e.sgm in self.pairs]

    def ranks(self) -> Counter:
        return Counter(p.rank for p in self.pairs.values())

    def alphas(self) -> Counter:
        return Counter(p.alpha for p in self.pairs.values())

    def dtypes(self) -> Counter:
        return Counter(p.A.dtype for p in self.pairs.values())

    def nbytes(self) -> int:
        return sum(p.A.nbytes + p.B.nbytes + (p.bias.nbytes if p.bias is not None else 0)
                   for p in self.pairs.values())

    def biased(self) -> list[LoraPair]:
        """Pairs that carry a trained bias, in architecture order."""
        return [p for p in self.ordered() if p.bias is not None]

    def cast(self, dtype: str | None) -> "LoraSet":
        if dtype is None:
            return self
        pairs = {k: LoraPair(p.module, p.A.astype(dtype), p.B.astype(dtype), p.alpha,
                             None if p.bias is None else p.bias.astype(dtype), p.part_ranks)
                 for k, p in self.pairs.items()}
        return LoraSet(pairs, self.layout, self.layout_note, self.source_format,
                       self.skipped, self.unmapped, self.ignored, self.notes, self.bias_keys, self.metadata,
                       self.source_kind)


@dataclass
class NamedHalves:
    """A parsed file before name resolution: module name -> {'A','B','alpha'}.

    ``space`` says which names the module keys are in: "sgm", "diffusers" or "kohya".
    """

    path: Path
    space: str
    fmt: str
    modules: dict[str, dict[str, Tensor]]
    # module -> key names as they appeared in the file (for error messages)
    keys: dict[str, dict[str, str]]
    skipped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    default_alpha: dict[str, float] = field(default_factory=dict)  # per component, from metadata
    alpha_overrides: dict[str, float] = field(default_factory=dict)  # per module name
    biases: dict[str, Tensor] = field(default_factory=dict)  # module -> trained bias (MindONE only)
    bias_keys: dict[str, str] = field(default_factory=dict)  # module -> bias key as in the file
    ignored: dict[str, list[str]] = field(default_factory=dict)  # kind -> skipped keys
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # kohya: ss_* / modelspec.* carried to the output
    source_kind: str = ""  # see LoraSet.source_kind


def _lookup(km: KeyMap, space: str, name: str) -> tuple[ModuleEntry, int] | None:
    if space == "sgm":
        e = km.by_sgm.get(name)
        return (e, -1) if e is not None else None
    if space == "diffusers":
        return km.by_diffusers.get(name)
    return km.by_kohya.get(name)


def _fits(km: KeyMap, halves: NamedHalves) -> tuple[int, int]:
    """(modules whose name and A/B shapes fit this layout, total modules)."""
    ok = 0
    for name, parts in halves.modules.items():
        hit = _lookup(km, halves.space, name)
        if hit is None or "A" not in parts or "B" not in parts:
            continue
        entry, part = hit
        if not entry.lora_able:
            continue
        rank = parts["A"].shape[0] if parts["A"].shape else 0
        exp_a, exp_b = entry.lora_shapes(rank)
        if part >= 0 and entry.fused:
            exp_b = (exp_b[0] // len(entry.diffusers), *exp_b[1:])
        if parts["A"].shape == exp_a and parts["B"].shape == exp_b:
            ok += 1
    return ok, len(halves.modules)


def choose_layout(halves: NamedHalves, layout: ModelLayout | None) -> tuple[ModelLayout, str]:
    """The given layout, or the one preset every module name and shape fits."""
    if layout is not None:
        return layout, f"layout '{layout.name}' (given)"
    if not halves.modules:
        raise KeyMapError("no LoRA tensors found in this file", path=halves.path)
    family = family_from_keys(halves.modules)
    # a transformer LoRA is fitted against the SD3 / Flux presets only, anything else against the UNet ones
    candidates = {n: p for n, p in PRESETS.items()
                  if (p.family in TRANSFORMER_FAMILIES) == (family is not None)
                  and family in (None, "transformer", p.family)}
    scores = {name: _fits(keymap_for(p), halves) for name, p in candidates.items()}
    full = [n for n, (ok, total) in scores.items() if ok == total]
    if family is not None and not full:
        what = "an SD3 or Flux" if family == "transformer" else f"an {family.upper()}" if family == "sd3" else "a Flux"
        best = max(scores, key=lambda n: scores[n][0])
        raise KeyMapError(
            f"{what} LoRA by its key names that fits no built-in size (best: {best}, {scores[best][0]}/"
            f"{scores[best][1]} modules match by name and shape); pass --layout with the model's pipeline folder, "
            f"its transformer config.json or tiny-sd3 / tiny-flux", path=halves.path)
    if len(full) == 1:
        return PRESETS[full[0]], f"layout '{full[0]}' (detected from names and shapes)"
    best = max(scores, key=lambda n: scores[n][0])
    ok, total = scores[best]
    if len(full) > 1:
        return PRESETS[full[0]], f"layout '{full[0]}' (detected; also fits {', '.join(full[1:])})"
    raise KeyMapError(
        f"fits no preset layout (best: {best}, {ok}/{total} modules match by name and shape); "
        f"pass --layout with the model's unet config.json or pipeline folder", path=halves.path)


def resolve(halves: NamedHalves, layout: ModelLayout | None, *, alpha: float | None,
            strict: bool, scale: float | None = None) -> LoraSet:
    """Turn named halves into a validated :class:`LoraSet`."""
    layout, note = choose_layout(halves, layout)
    km = keymap_for(layout)
    path = halves.path
    unmapped = list(halves.unknown)
    fused_parts: dict[str, dict[int, tuple[str, dict[str, Tensor]]]] = {}
    pairs: dict[str, LoraPair] = {}
    bias_keys: dict[str, str] = {}
    for name, key in halves.bias_keys.items():
        if name not in halves.modules:
            raise KeyMapError("a trained bias of a module with no LoRA in this file (MindONE bias='all'?); "
                              "only biases of LoRA modules (bias='lora_only') can be converted",
                              path=path, key=key)

    for name, parts in halves.modules.items():
        keys = halves.keys[name]
        for half in ("A", "B"):
            if half not in parts:
                other = "B" if half == "A" else "A"
                raise KeyMapError(f"has no matching lora_{half} (or lora_{'down' if half == 'A' else 'up'}) tensor",
                                  path=path, key=keys[other])
        a, b = parts["A"], parts["B"]
        for half, t in (("A", a), ("B", b)):
            if not t.is_finite():
                raise KeyMapError("contains NaN or Inf values", path=path, key=keys[half])
        if a.dtype != b.dtype:
            raise KeyMapError(f"dtype {b.dtype} differs from its lora_A's {a.dtype}", path=path, key=keys["B"])
        if len(a.shape) not in (2, 4) or len(b.shape) not in (2, 4) or a.shape[0] != b.shape[1]:
            raise KeyMapError(f"rank mismatch: lora_A {list(a.shape)} vs lora_B {list(b.shape)}",
                              path=path, key=keys["B"])
        hit = _lookup(km, halves.space, name)
        if hit is None or not hit[0].lora_able:
            unmapped.append(keys["A"])
            if name in halves.bias_keys:
                unmapped.append(halves.bias_keys[name])
            continue
        entry, part = hit
        exp_a, exp_b = entry.lora_shapes(a.shape[0])
        if part >= 0 and entry.fused:
            exp_b = (exp_b[0] // len(entry.diffusers), *exp_b[1:])
        if a.shape != exp_a or b.shape != exp_b:
            bad, got, exp = ("A", a.shape, exp_a) if a.shape != exp_a else ("B", b.shape, exp_b)
            raise KeyMapError(f"shape {list(got)} does not fit layout '{layout.name}' module "
                              f"{entry.sgm} (expected {list(exp)})", path=path, key=keys[bad])
        mod_alpha = halves.alpha_overrides.get(name)
        if mod_alpha is None:
            mod_alpha = halves.default_alpha.get(entry.component)
        if alpha is not None:
            mod_alpha = alpha
        if scale is not None:  # MindONE's LDM LoRA: output = linear(x) + scale * up(down(x)), no alpha
            mod_alpha = scale * a.shape[0]
        if mod_alpha is None:
            mod_alpha = float(a.shape[0])
        if entry.fused and part >= 0:
            fused_parts.setdefault(entry.sgm, {})[part] = (keys["A"], {"A": a, "B": b, "alpha": mod_alpha})
            continue
        bias = halves.biases.get(name)
        if bias is not None:
            _check_bias(path, halves.bias_keys[name], entry, bias, layout)
            bias_keys[entry.sgm] = halves.bias_keys[name]
        pairs[entry.sgm] = LoraPair(entry, a, b, float(mod_alpha), bias)

    for sgm, parts in fused_parts.items():
        pairs[sgm] = _fuse(path, km.by_sgm[sgm], parts)

    if unmapped and strict:
        shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise KeyMapError(f"{len(unmapped)} LoRA key(s) do not map to layout '{layout.name}': {shown} "
                          f"(--no-strict skips them)", path=path, key=unmapped[0])
    return LoraSet(pairs, layout, note, halves.fmt, list(halves.skipped), unmapped,
                   dict(halves.ignored), list(halves.notes), bias_keys, dict(halves.metadata), halves.source_kind)


def _check_bias(path: Path, key: str, entry: ModuleEntry, bias: Tensor, layout: ModelLayout) -> None:
    """A trained bias must belong to a layer that has one, with its shape, finite."""
    if not entry.bias:
        raise KeyMapError(f"module {entry.sgm} has no bias in layout '{layout.name}' "
                          f"(MindONE builds it without one)", path=path, key=key)
    if bias.shape != (entry.out_features,):
        raise KeyMapError(f"bias shape {list(bias.shape)} does not fit module {entry.sgm} "
                          f"(expected [{entry.out_features}])", path=path, key=key)
    if bias.dtype not in FLOAT_DTYPES:
        raise KeyMapError(f"bias has dtype {bias.dtype}, not a float type", path=path, key=key)
    if not bias.is_finite():
        raise KeyMapError("contains NaN or Inf values", path=path, key=key)


def _fuse(path: Path, entry: ModuleEntry, parts: dict) -> LoraPair:
    """q/k/v LoRAs back into one fused in_proj LoRA, exactly.

    Parts sharing lora_A and alpha (what our writers make of a fused LoRA) fuse to the same rank by
    stacking lora_B.  Independently trained parts (sd-scripts trains bigG's q/k/v as three LoRAs) fuse to
    one LoRA of rank r_q + r_k + r_v: A stacked, B block-diagonal, alpha scaled so alpha / rank stays each
    part's scale; no tensor value changes, so the PEFT / kohya writers split it back bitwise.  Parts whose
    scales differ cannot share one fused scale without rescaling a tensor: refused.
    """
    n = len(entry.diffusers)
    missing = [entry.diffusers[i] for i in range(n) if i not in parts]
    if missing:
        some_key = next(iter(parts.values()))[0]
        raise KeyMapError(f"fused {entry.sgm} needs LoRA on q, k and v; missing {', '.join(missing)}",
                          path=path, key=some_key)
    key0, first = parts[0]
    if all(parts[i][1]["alpha"] == first["alpha"] and parts[i][1]["A"].bitwise_equal(first["A"])
           for i in range(1, n)):
        b = np.concatenate([parts[i][1]["B"].data for i in range(n)], axis=0)
        return LoraPair(entry, first["A"], Tensor(first["B"].dtype, b), float(first["alpha"]))
    ranks = tuple(parts[i][1]["A"].shape[0] for i in range(n))
    scales = [parts[i][1]["alpha"] / ranks[i] for i in range(n)]
    for i in range(1, n):
        key, p = parts[i]
        if scales[i] != scales[0]:
            raise KeyMapError(f"cannot be fused exactly into {entry.sgm}: its alpha/rank {p['alpha']:g}/{ranks[i]} "
                              f"differs from {entry.diffusers[0]}'s {first['alpha']:g}/{ranks[0]} (one fused "
                              f"LoRA has one scale)", path=path, key=key)
        if p["A"].dtype != first["A"].dtype:
            raise KeyMapError(f"dtype {p['A'].dtype} differs from {entry.diffusers[0]}'s {first['A'].dtype}",
                              path=path, key=key)
    total = sum(ranks)
    a = np.concatenate([parts[i][1]["A"].data for i in range(n)], axis=0)
    rows = [parts[i][1]["B"].data for i in range(n)]
    b = np.zeros((sum(r.shape[0] for r in rows), total, *rows[0].shape[2:]), dtype=rows[0].dtype)
    r0 = c0 = 0
    for blk in rows:
        b[r0:r0 + blk.shape[0], c0:c0 + blk.shape[1]] = blk
        r0, c0 = r0 + blk.shape[0], c0 + blk.shape[1]
    alpha = float(first["alpha"]) * total / ranks[0]
    return LoraPair(entry, Tensor(first["A"].dtype, a), Tensor(first["B"].dtype, b), alpha, part_ranks=ranks)


def split_parts(p: LoraPair) -> list[tuple[Tensor, Tensor, float]] | None:
    """(A, B, alpha) per part of a fused pair whose B is block-diagonal, or None.

    The blocks are the recorded ``part_ranks``, or equal blocks when B's off-block entries are all exactly
    zero and its diagonal blocks are not (a block-diagonal LoRA that went through a MindONE .ckpt, which
    records nothing): each part then holds only its own block, bitwise, and its alpha keeps the fused scale.
    """
    n = len(p.module.diffusers)
    if n == 1:
        return None
    ranks = p.part_ranks
    if ranks is None:
        if p.rank % n:
            return None
        ranks = (p.rank // n,) * n
    rows = p.B.shape[0] // n
    bounds = np.cumsum((0, *ranks))
    out = []
    for i in range(n):
        bi = p.B.data[i * rows:(i + 1) * rows]
        lo, hi = bounds[i], bounds[i + 1]
        if np.any(bi[:, :lo]) or np.any(bi[:, hi:]) or (p.part_ranks is None and not np.any(bi[:, lo:hi])):
            return None  # not block-diagonal (or, unrecorded, an all-zero block: nothing says it was split)
        out.append((Tensor(p.A.dtype, np.ascontiguousarray(p.A.data[lo:hi])),
                    Tensor(p.B.dtype, np.ascontiguousarray(bi[:, lo:hi])), p.scale * int(ranks[i])))
    return out


def check_alpha(alpha: float | None, option: str = "--alpha") -> float | None:
    if alpha is None:
        return None
    if not np.isfinite(alpha) or alpha <= 0:
        raise LoraParityError(f"{option} must be a positive number, got {alpha}")
    return float(alpha)
