"""Which arithmetic the port uses where MindONE's ``gm`` code and diffusers differ: ``NUMERICS``.

The port stands in for MindONE's SGM ``gm`` code (``examples/stable_diffusion_xl/gm/`` in
mindspore-lab/mindone, the code that trained the ``.ckpt`` LoRAs users convert).  Where ``gm``
computes something differently from diffusers / transformers, the port has both:

* ``"mindone"`` (the default): compute as ``gm`` does, with the same MindSpore ops;
* ``"diffusers"``: compute as diffusers does, to about 1e-6 (the port's earlier behaviour).

Each such place is a *point* (:data:`POINTS`); a mode is a set of points computed MindONE's way
(:class:`Numerics`).  ``"mindone"`` is :data:`MINDONE_DEFAULT` (every point but the two opt-in ones,
``clip_l_activation`` and ``conv_kernel``, see below), ``"diffusers"`` none.  Points:

``timestep_freqs``
    sinusoid frequencies of the UNet timestep embedding and of the size/crop/target (or
    aesthetic score) embedders: ``gm`` takes ``ops.exp(-ops.log(P) * arange(half) / half)`` from
    MindSpore (its CPU Exp is up to ~50 ulp off); diffusers' exp is correctly rounded.
``gelu_formula``
    exact (erf) GELU in the UNet GEGLU gate and OpenCLIP's MLP: ``gm`` calls
    ``ops.gelu(x, "none")`` = ``x * (erf(x / sqrt(2)) + 1) * 0.5``; torch ``x * 0.5 * (1 + erf(x * 1/sqrt(2)))``.
``clip_l_activation``
    CLIP-L's MLP activation: ``gm``'s HF-CLIP port maps ``hidden_act`` ``"quick_gelu"`` (and
    ``"gelu"``) to ``mindspore.nn.GELU()``, whose default is the *tanh approximation*; transformers
    computes quick GELU ``x * sigmoid(1.702 x)``.  Not an ulp effect: up to 0.021 per element.
    *Opt-in* (``"mindone:+clip_l_activation"``): it is a property of MindONE's base text encoder,
    not of the LoRA, and no PyTorch loader reproduces it, so following it by default would fail every
    port comparison at CLIP-L by ~1e-2 (measured: text encoder 1.2e-2, UNet 5.7e-3, 4-step image MAE
    0.18), which no tolerance could absorb without hiding real faults.  ``compare --port-numerics
    mindone:+clip_l_activation`` shows what a MindONE ``gm`` user's images differ by.
``attention_scale``
    ``gm``'s UNet and VAE attention divide the scores by ``sqrt(d)``; its CLIP-L and OpenCLIP scale
    ``q`` by ``d ** -0.5`` before ``q @ k^T``; the port otherwise multiplies the scores by ``1/sqrt(d)``.
``attention_mask``
    ``gm``'s text encoders add a causal mask of ``-1e5`` (not ``-inf``).  No effect in float32.
``compute_dtype``
    ``gm`` runs softmax and GroupNorm in the input's dtype (MindSpore's ``nn.GroupNorm`` casts gamma
    and beta to it); the port otherwise computes both in float32.  Only float16 / bfloat16 differ.
``silu_kernel``
    ``gm``'s UNet uses ``nn.SiLU`` (MindSpore's SiLU kernel); its VAE ``x * sigmoid(x)``, as the port.
``vae_latent_scale``
    ``gm`` decodes ``1.0 / scale_factor * z`` (a multiplication); diffusers divides by it.
``lora_merge``
    merging a LoRA into a Dense weight: ``gm``'s ``set_train(False)`` assigns
    ``W + matmul(B, A) * scaling`` computed with MindSpore ops in the weight's dtype; the port
    otherwise folds ``scale * B @ A`` in float64 and rounds once.
``conv_kernel``
    ``gm``'s convolutions are ``nn.Conv2d`` (MindSpore's Conv2D kernel); the port's default is
    im2col + MatMul (:func:`~.layers.set_conv_impl`).  About 1e-6 relative on the tiny fixture, but
    20-100x slower on CPU at full size, so it is *not* in ``"mindone"``: ask for ``"mindone:+conv_kernel"``.

Selecting (before cells are built -- cells take the mode when constructed; :func:`apply_numerics`
re-stamps a built cell tree; free functions such as :func:`~.unet.timestep_embedding` and
:func:`~.lora.merge_lora` read the mode when called):

* the environment variable :data:`ENV_VAR` (``LORA_PARITY_PORT_NUMERICS``), read whenever nothing
  was set in the process (so a child process inherits it);
* :func:`set_numerics` (process-wide) or the context manager :func:`use_numerics`.

A spec is ``MODE`` or ``MODE:ITEMS``: ``mindone``, ``diffusers``, ``mindone:timestep_freqs,lora_merge``
(exactly these points), ``mindone:-clip_l_activation`` / ``diffusers:+timestep_freqs`` (the mode's set
minus / plus points).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

NUMERICS = ("mindone", "diffusers")
DEFAULT = "mindone"
ENV_VAR = "LORA_PARITY_PORT_NUMERICS"

POINTS = ("timestep_freqs", "gelu_formula", "clip_l_activation", "attention_scale", "attention_mask",
          "compute_dtype", "silu_kernel", "vae_latent_scale", "lora_merge", "conv_kernel")
OPT_IN = frozenset({"conv_kernel", "clip_l_activation"})
MINDONE_DEFAULT = frozenset(POINTS) - OPT_IN
_MODE_POINTS = {"mindone": MINDONE_DEFAULT, "diffusers": frozenset()}


@dataclass(frozen=True)
class Numerics:
    """A numerics selection: the mode's name and the points computed MindONE's (``gm``'s) way."""

    mode: str
    points: frozenset

    def uses(self, point: str) -> bool:
        """Whether ``point`` is computed as MindONE's ``gm`` computes it."""
        if point not in POINTS:
            raise ValueError(f"unknown numerics point {point!r} (known: {', '.join(POINTS)})")
        return point in self.points

    @property
    def spec(self) -> str:
        """The shortest spec :func:`parse` reads back to this selection."""
        base = _MODE_POINTS[self.mode]
        if self.points == base:
            return self.mode
        plus = [p for p in POINTS if p in self.points - base]
        minus = [p for p in POINTS if p in base - self.points]
        return f"{self.mode}:" + ",".join([f"+{p}" for p in plus] + [f"-{p}" for p in minus])

    def __str__(self) -> str:
        return self.spec


def parse(spec: str, points: Iterable[str] | None = None) -> Numerics:
    """``"mindone"``, ``"diffusers"``, ``"mindone:a,b"``, ``"mindone:-a"``, ``"diffusers:+a"``
    (see the module docstring); ``points`` (names) replaces the set, as ``MODE:a,b`` does."""
    mode, _, items = str(spec).strip().partition(":")
    mode = mode.strip().lower()
    if mode not in NUMERICS:
        raise ValueError(f"unknown port numerics {spec!r}: the mode is one of {', '.join(NUMERICS)}")
    chosen = set(_MODE_POINTS[mode])
    names = [i.strip() for i in items.split(",") if i.strip()]
    if points is not None:
        if names:
            raise ValueError("give the points either in the spec or as points=, not both")
        names = list(points)
    signed = [n for n in names if n[0] in "+-"]
    if signed and len(signed) != len(names):
        raise ValueError(f"port numerics {spec!r}: either list points, or add (+p) / remove (-p) them")
    for n in names:
        p = n.lstrip("+-")
        if p not in POINTS:
            raise ValueError(f"unknown numerics point {p!r} in {spec!r} (known: {', '.join(POINTS)})")
    if names and not signed:
        chosen = {n for n in names}
    for n in signed:
        (chosen.add if n[0] == "+" else chosen.discard)(n[1:])
    return Numerics(mode, frozenset(chosen))


_selected: Numerics | None = None  # set_numerics / numerics(); None: the environment, else DEFAULT


def current_numerics() -> Numerics:
    """The selection in force: the last :func:`set_numerics`, else ``$LORA_PARITY_PORT_NUMERICS``,
    else ``"mindone"``."""
    if _selected is not None:
        return _selected
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            return parse(env)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}={env!r}: {exc}") from None
    return parse(DEFAULT)


def current() -> str:
    """The mode in force: ``"mindone"`` or ``"diffusers"``."""
    return current_numerics().mode


def uses(point: str) -> bool:
    """Whether the selection in force computes ``point`` MindONE's way."""
    return current_numerics().uses(point)


def resolve(mode: str | Numerics | None = None) -> Numerics:
    """``mode`` as a :class:`Numerics` (a spec string, a Numerics, or None for the current one)."""
    if mode is None:
        return current_numerics()
    if isinstance(mode, Numerics):
        return mode
    return parse(mode)


def set_numerics(mode: str | Numerics | None, points: Iterable[str] | None = None) -> Numerics:
    """Select the port's numerics for the whole process (cells built from now on; free functions
    from their next call).  ``None`` goes back to the environment variable / the default.
    Returns the previous explicit selection (None if there was none), for restoring."""
    global _selected
    old = _selected
    _selected = None if mode is None and points is None else (
        parse(mode or DEFAULT, points) if not isinstance(mode, Numerics) else mode)
    return old


def _restore(old: Numerics | None) -> None:
    global _selected
    _selected = old


@contextlib.contextmanager
def use_numerics(mode: str | Numerics, points: Iterable[str] | None = None) -> Iterator[Numerics]:
    """``with use_numerics("diffusers"): build / call cells`` -- the selection for the body, restored after."""
    old = set_numerics(mode, points)
    try:
        yield current_numerics()
    finally:
        _restore(old)


# --------------------------------------------------------------------------- cells

def stamp(cell, points: Iterable[str], nx: Numerics | None = None) -> None:
    """Set ``cell.mindone_<point>`` (a plain bool: part of a compiled graph's structure key) for
    each of ``points`` from ``nx`` (default: the selection in force)."""
    nx = resolve(nx)
    for p in points:
        setattr(cell, "mindone_" + p, nx.uses(p))


def describe(mode: str | Numerics | None = None) -> dict:
    """The selection as plain data (for a report's meta): spec, mode, points MindONE-style."""
    nx = resolve(mode)
    return {"spec": nx.spec, "mode": nx.mode, "mindone_points": [p for p in POINTS if p in nx.points]}
