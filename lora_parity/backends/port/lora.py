"""LoRA the way MindONE applies it: unmerged ``lora_A`` / ``lora_B`` next to the base Dense.

A MindONE LoRA checkpoint names ``<layer>.lora_A.weight`` (r, in) and
``<layer>.lora_B.weight`` (out, r) next to the untouched ``<layer>.weight``; the layer
computes ``base(x) + scale * (x A^T) B^T`` with ``scale = alpha / r`` (alpha defaults
to r, i.e. scale 1).  MindONE's SD 1.x / 2.x ``LoRADenseLayer`` files spell them ``lora_down`` / ``lora_up``
and compute the same ``linear(x) + lora_up(lora_down(x)) * scale`` (``--lora_scale``, read as alpha / r); the
port's LDM components name their parameters that way (``Recordable.lora_spelling``).  :func:`inject_lora` adds exactly those child cells to the
:class:`~.layers.Linear` layers named in a LoRA dict, names them, and loads the
values with :func:`mindspore.load_param_into_net`.  :func:`merge_lora` folds
``W += scale * B @ A`` (and :func:`unmerge_lora` undoes it).

OpenCLIP's fused attention has no Dense for q/k/v: a LoRA on
``...resblocks.N.attn.in_proj`` (A (r, W), B (3W, r)) becomes a ``_LoRAPair`` cell named
``attn.in_proj`` whose output is added to the fused in-projection.

Convolutions take a LoCon LoRA (the PEFT / diffusers / kohya form): ``lora_A`` (r, in, kh, kw)
is a convolution with the base layer's kernel, stride and padding, ``lora_B`` (out, r, 1, 1) a
1x1 convolution, ``y = conv(x) + scale * B(A(x))``.  Merging folds
``W += scale * (B[:, :, 0, 0] @ A.reshape(r, -1)).reshape(W.shape)``: exact because a 1x1
convolution after a kxk one is the kxk convolution with the product kernel.

How :func:`merge_lora` rounds follows the ``lora_merge`` numerics point (:mod:`.numerics`):
MindONE's ``gm.modules.lora.Dense.set_train(False)`` assigns ``W + matmul(B, A) * scaling``
computed with MindSpore ops in the weight's dtype (the default); the ``"diffusers"`` mode folds
``scale * B @ A`` in float64 and rounds once.  ``gm`` has no LoRA for convolutions or the fused
OpenCLIP ``in_proj``: those always fold in float64.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from dataclasses import dataclass, field

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from lora_parity.errors import LoraParityError
from lora_parity.backends.port import numerics as _nx
from lora_parity.backends.port.layers import Conv2d, Linear, Recordable
from lora_parity.backends.port.text import MultiheadAttention, _LoRAPair

_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")
_WHICH = {"lora_A": "A", "lora_B": "B", "lora_down": "A", "lora_up": "B"}


def _split_key(key: str) -> tuple[str, str]:
    """``<layer>.lora_A.weight`` / ``<layer>.lora_down.weight`` (MindONE's LDM spelling) -> (layer, "A" | "B")."""
    layer, half, _ = key.rsplit(".", 2)
    return layer, _WHICH[half]


def _spelt(net: Recordable, layer: str, which: str) -> str:
    """The checkpoint name of a layer's LoRA matrix in ``net`` (``lora_A`` / ``lora_down`` ...)."""
    return f"{layer}.{net.lora_spelling[0 if which == 'A' else 1]}.weight"


@dataclass
class LoraInjection:
    """What :func:`inject_lora` did: wrapped layer names (SGM), keys it left to other nets."""

    wrapped: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    scales: dict[str, float] = field(default_factory=dict)


def _layer_index(net: Recordable) -> dict[str, nn.Cell]:
    """SGM layer name -> the Linear / Conv2d / fused attention cell a LoRA may target."""
    out: dict[str, nn.Cell] = {}
    for path, cell in net.cells_and_names():
        if isinstance(cell, (Linear, Conv2d)) and not path.endswith((".lora_A", ".lora_B")):
            out[net.sgm_prefix + path] = cell
        elif isinstance(cell, MultiheadAttention):
            out[net.sgm_prefix + path + ".in_proj"] = cell
    return out


def lora_targets(net: Recordable) -> list[str]:
    """Names of every layer of ``net`` a LoRA may target (Dense and Conv2d layers, OpenCLIP ``attn.in_proj``)."""
    return sorted(_layer_index(net))


def _as_numpy(v) -> np.ndarray:
    if isinstance(v, Tensor):
        return v.asnumpy()
    if hasattr(v, "detach"):  # a torch tensor, without importing torch
        return v.detach().cpu().float().numpy()
    return np.asarray(v)


def inject_lora(net: Recordable, lora_params: dict, alpha: float | dict | None = None, *,
                strict: bool = True) -> LoraInjection:
    """Wrap the layers of ``net`` named in ``lora_params`` and load their A/B matrices.

    ``lora_params``: SGM name -> array, keys ``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight``, or
    MindONE's LDM ``lora_down`` / ``lora_up`` (numpy, MindSpore or torch tensors); the parameters are
    named as ``net.lora_spelling`` says.  ``alpha``: one value for all layers, a dict
    layer name -> alpha, or None (alpha = r, scale 1, as MindONE).  Keys outside
    ``net.sgm_prefix`` are skipped (see the returned :class:`LoraInjection`), so one dict can
    be injected into the UNet and both text encoders in turn.  With ``strict``, keys
    under the prefix that name no layer of ``net``, or A/B pairs with the wrong shapes,
    raise :class:`~lora_parity.errors.LoraParityError`.
    """
    index = _layer_index(net)
    result = LoraInjection()
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, value in lora_params.items():
        if not key.startswith(net.sgm_prefix) or not key.endswith(_SUFFIXES):
            if key.startswith(net.sgm_prefix) and strict and ".lora_" in key:
                raise LoraParityError(f"not a lora_A/lora_B weight: {key}")
            result.skipped_keys.append(key)
            continue
        layer, which = _split_key(key)
        layers.setdefault(layer, {})[which] = _as_numpy(value)

    loads: list[tuple[nn.Cell, str, np.ndarray]] = []
    for layer, ab in sorted(layers.items()):
        cell = index.get(layer)
        if cell is None or set(ab) != {"A", "B"}:
            if strict:
                why = "no such layer" if cell is None else "needs both lora_A and lora_B"
                raise LoraParityError(f"cannot inject LoRA into {layer}: {why}")
            result.skipped_keys.extend(_spelt(net, layer, w) for w in ab)
            continue
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if isinstance(cell, Conv2d):
            k = cell.kernel
            ok = a.shape == (r, cell.cin, k, k) and b.shape == (cell.cout, r, 1, 1)
            expected = f"a ({cell.cout}, {cell.cin}, {k}, {k}) convolution"
            fan_in, fan_out = cell.cin, cell.cout
        else:
            if isinstance(cell, MultiheadAttention):
                fan_in, fan_out = cell.width, 3 * cell.width
            else:
                fan_in, fan_out = cell.in_features, cell.out_features
            ok = a.ndim == 2 and b.ndim == 2 and a.shape[1] == fan_in and b.shape == (fan_out, r)
            expected = f"a ({fan_out}, {fan_in}) layer"
        if not ok:
            raise LoraParityError(
                f"LoRA shapes for {layer} do not fit {expected}: A {tuple(a.shape)}, B {tuple(b.shape)}")
        layer_alpha = alpha.get(layer) if isinstance(alpha, dict) else alpha
        scale = 1.0 if layer_alpha is None else float(layer_alpha) / r
        holder = _attach(cell, fan_in, fan_out, r, scale)
        result.wrapped.append(layer)
        result.scales[layer] = scale
        loads.append((holder.lora_A, _spelt(net, layer, "A"), a))
        loads.append((holder.lora_B, _spelt(net, layer, "B"), b))

    net.restamp_names()
    for child, name, arr in loads:
        if child.weight.name != name:  # restamp_names gives every param its SGM name
            raise LoraParityError(f"LoRA parameter named {child.weight.name}, expected {name}")
        value = Parameter(Tensor(np.ascontiguousarray(arr), child.weight.dtype), name=name)
        not_loaded, _ = ms.load_param_into_net(child, {name: value}, strict_load=True)
        if not_loaded:
            raise LoraParityError(f"LoRA parameter did not load: {name}")
    return result


def _attach(cell: nn.Cell, fan_in: int, fan_out: int, r: int, scale: float) -> nn.Cell:
    """Give ``cell`` its (zero) lora_A / lora_B children; returns the cell that holds them."""
    if isinstance(cell, MultiheadAttention):
        if cell.in_proj is not None and cell.in_proj.merged:
            raise LoraParityError("a merged LoRA is already folded into this in_proj; unmerge first")
        cell.in_proj = _LoRAPair(fan_in, fan_out, r, scale)
        return cell.in_proj
    if cell.lora_A is not None and cell.lora_merged:
        raise LoraParityError("a merged LoRA is already folded into this layer; unmerge first")
    if isinstance(cell, Conv2d):
        # the "down" convolution sees the same windows as the base; the "up" one mixes channels
        cell.lora_A = Conv2d(fan_in, r, cell.kernel, cell.stride, cell.padding, impl=cell.impl, bias=False)
        cell.lora_B = Conv2d(r, fan_out, 1, 1, 0, impl=cell.impl, bias=False)
    else:
        cell.lora_A = Linear(fan_in, r, bias=False)
        cell.lora_B = Linear(r, fan_out, bias=False)
    cell.lora_scale = float(scale)
    cell.lora_merged = False
    return cell


def _lora_cells(net: nn.Cell):
    for _, cell in net.cells_and_names():
        if isinstance(cell, (Linear, Conv2d)) and cell.lora_A is not None:
            yield cell, cell.weight, cell.lora_A.weight, cell.lora_B.weight, cell.lora_scale
        elif isinstance(cell, MultiheadAttention) and cell.in_proj is not None:
            p = cell.in_proj
            yield cell, cell.in_proj_weight, p.lora_A.weight, p.lora_B.weight, p.scale


def _is_merged(cell) -> bool:
    return cell.in_proj.merged if isinstance(cell, MultiheadAttention) else cell.lora_merged


def _set_merged(cell, value: bool) -> None:
    if isinstance(cell, MultiheadAttention):
        cell.in_proj.merged = value
    else:
        cell.lora_merged = value


def _delta(w, a, b, scale: float) -> np.ndarray:
    """``scale * B @ A`` in float64, in the base weight's shape (conv: (out, r, 1, 1) x (r, in, k, k))."""
    a64 = a.asnumpy().astype(np.float64)
    b64 = b.asnumpy().astype(np.float64)
    prod = b64.reshape(b64.shape[0], -1) @ a64.reshape(a64.shape[0], -1)
    return (scale * prod).reshape(tuple(w.shape))


def _gm_fold(w, a, b, scale: float, sign: int) -> Tensor:
    """``gm``'s ``ops.assign(W, W +/- ops.matmul(B, A) * scaling)``: MindSpore ops, the weight's dtype."""
    from mindspore import ops

    prod = ops.matmul(b, a) * scale
    return w + prod if sign > 0 else w - prod


def _fold(cell, w, a, b, scale: float, sign: int, gm: bool) -> None:
    if gm and isinstance(cell, Linear):
        w.set_data(_gm_fold(w, a, b, scale, sign))
        return
    delta = _delta(w, a, b, scale)
    w.set_data(Tensor((w.asnumpy().astype(np.float64) + sign * delta).astype(w.asnumpy().dtype), w.dtype))


def merge_lora(net: nn.Cell, numerics=None) -> int:
    """Fold every injected LoRA into its base weight (``W += scale * B @ A``, convolutions
    included: the product kernel reshaped to ``W``); returns the count.

    The LoRA parameters stay (so the names still match the checkpoint) but are no
    longer applied in ``construct``.  Dense layers: as ``gm`` does under the ``lora_merge``
    numerics point (``numerics``: a mode / spec, default the selection in force), else -- and
    always for convolutions and fused in_proj -- in float64, stored in the weight's dtype.
    """
    gm = _nx.resolve(numerics).uses("lora_merge")
    n = 0
    for cell, w, a, b, scale in _lora_cells(net):
        if _is_merged(cell):
            continue
        _fold(cell, w, a, b, scale, +1, gm)
        _set_merged(cell, True)
        n += 1
    return n


def unmerge_lora(net: nn.Cell, numerics=None) -> int:
    """Undo :func:`merge_lora` (``W -= scale * B @ A``, as ``gm``'s ``set_train(True)`` under the
    ``lora_merge`` numerics point), back to the unmerged computation."""
    gm = _nx.resolve(numerics).uses("lora_merge")
    n = 0
    for cell, w, a, b, scale in _lora_cells(net):
        if not _is_merged(cell):
            continue
        _fold(cell, w, a, b, scale, -1, gm)
        _set_merged(cell, False)
        n += 1
    return n


def carries_lora(net: nn.Cell) -> bool:
    """Whether any LoRA is injected in ``net`` (merged or not): the cells :func:`lora_disabled` would turn off."""
    return next(_lora_cells(net), None) is not None


def lora_state(net: nn.Cell) -> dict[str, np.ndarray]:
    """Every ``lora_A`` / ``lora_B`` weight of ``net`` by SGM name (what MindONE would save)."""
    return {p.name: p.asnumpy() for p in net.get_parameters() if ".lora_" in p.name}


@contextlib.contextmanager
def lora_disabled(net: nn.Cell) -> Iterator[int]:
    """Every injected LoRA of ``net`` off until the block ends (its base weights only); yields the count.

    The LoRA's own effect is measured as the difference of a block's output with and without it on the
    same inputs.  Unmerged cells skip their LoRA path (the ``merged`` flag is what ``construct`` reads);
    merged cells are unmerged first and merged again afterwards."""
    cells = [c for c, *_ in _lora_cells(net)]
    merged = [c for c in cells if _is_merged(c)]
    if merged:
        unmerge_lora(net)
    for c in cells:
        _set_merged(c, True)
    try:
        yield len(cells)
    finally:
        for c in cells:
            _set_merged(c, False)
        if merged:
            merge_lora(net)
