"""Building blocks shared by the MindSpore SDXL cells.

Parameter names follow MindSpore's own conventions, which is what MindONE
checkpoints contain: ``weight``/``bias`` for Dense and Conv2d, ``gamma``/``beta``
for GroupNorm and LayerNorm, ``embedding_table`` for embeddings.

Numerics follow :mod:`.numerics`: by default (``"mindone"``) what MindONE's ``gm`` code
computes with the same MindSpore ops (``ops.gelu``, ``ops.silu``, scores divided by sqrt(d),
softmax and GroupNorm in the input's dtype); ``"diffusers"`` tracks PyTorch to a few ulps
(norms and softmax in float32, scores times 1/sqrt(d), torch's erf GELU formula).  Both:
exact nearest upsampling, convolutions as im2col + MatMul (MindSpore's kernel on request).
Every weight starts lazily zero-initialised (``initializer('zeros')`` allocates nothing until data is set),
so even the full SDXL model instantiates in about a second; real values always
come from a checkpoint.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from lora_parity.backends.port import numerics as _nx
from lora_parity.backends.port.graph import run_graph


def _param(shape, name: str, fill: str = "zeros", dtype=ms.float32) -> Parameter:
    return Parameter(initializer(fill, tuple(int(s) for s in shape), dtype), name=name)


#: a LoRA's (down, up) matrix names per MindONE writer: ``gm`` (SDXL) and the LDM code (SD 1.x / 2.x)
LORA_SPELLINGS = {"gm": ("lora_A", "lora_B"), "ldm": ("lora_down", "lora_up")}


# --------------------------------------------------------------------------- activation capture

class Recordable(nn.Cell):
    """A top-level component that can record the outputs of its named blocks.

    Calls run PyNative unless :func:`~.graph.compile_for_graph` switched the cell to graph
    mode (``use_graph``); recording always runs PyNative.

    ``sgm_prefix`` is prepended to every parameter name (so the cell loads a MindONE
    checkpoint with :func:`mindspore.load_param_into_net` as is) and to every
    recorded activation name.  :meth:`parameters_and_names` yields the prefixed names.
    """

    def __init__(self, sgm_prefix: str = ""):
        super().__init__()
        self.sgm_prefix = sgm_prefix
        self.recorder: dict | None = None
        self.replay: dict | None = None  # name -> the reference's output, handed on instead of ours (replay)
        self.use_graph = False  # see graph.compile_for_graph
        # what a LoRA's two matrices are called in this component's checkpoint names: gm's lora_A / lora_B,
        # or MindONE's LDM (SD 1.x / 2.x) LoRADenseLayer lora_down / lora_up (see lora.inject_lora)
        self.lora_spelling = LORA_SPELLINGS["gm"]

    def __call__(self, *args, **kwargs):
        # graph mode (opt-in) for plain calls; recording needs PyNative (it reads every block)
        if self.use_graph and self.recorder is None and ms.get_context("mode") == ms.PYNATIVE_MODE:
            return run_graph(self, *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _finish(self) -> None:
        """Call at the end of ``__init__`` (and after adding cells): stamps full names on all params."""
        self.restamp_names()

    def restamp_names(self) -> None:
        """Set every ``Parameter.name`` to ``sgm_prefix`` + its attribute path (a LoRA's ``lora_A`` /
        ``lora_B`` children spelt as :attr:`lora_spelling`, the checkpoint's names)."""
        down, up = self.lora_spelling
        for name, param in nn.Cell.parameters_and_names(self):
            if down != "lora_A":
                name = name.replace(".lora_A.", f".{down}.").replace(".lora_B.", f".{up}.")
            param.name = self.sgm_prefix + name

    def parameters_and_names(self, name_prefix: str = "", expand: bool = True):
        base = self.sgm_prefix.rstrip(".")
        if name_prefix:
            base = f"{name_prefix}.{base}" if base else name_prefix
        return super().parameters_and_names(name_prefix=base, expand=expand)

    def _rec(self, name: str, value: Tensor) -> Tensor:
        """Record ``value`` under the block's full name; returns what the network goes on with: ``value``,
        or during a replay (:func:`replay_activations`) the reference's output of the same block, so the
        next block starts from the reference's exact inputs and records only the error it adds itself."""
        if self.recorder is None:
            return value
        key = self.sgm_prefix + name
        self.recorder[key] = value.astype(ms.float32).asnumpy().copy() if value.dtype == ms.bfloat16 \
            else value.asnumpy().copy()
        ref = None if self.replay is None else self.replay.get(key)
        if ref is None or tuple(ref.shape) != tuple(value.shape):  # a shape mismatch is the judge's to report
            return value
        return Tensor(np.ascontiguousarray(ref, dtype=np.float32)).astype(value.dtype)


@contextlib.contextmanager
def capture_activations(*cells: Recordable) -> Iterator[dict[str, np.ndarray]]:
    """``with capture_activations(unet) as acts: unet(...)`` fills ``acts`` (SGM name -> numpy)."""
    acts: dict[str, np.ndarray] = {}
    old = [c.recorder for c in cells]
    for c in cells:
        c.recorder = acts
    try:
        yield acts
    finally:
        for c, o in zip(cells, old):
            c.recorder = o


@contextlib.contextmanager
def replay_activations(ref: dict[str, np.ndarray], *cells: Recordable) -> Iterator[dict[str, np.ndarray]]:
    """As :func:`capture_activations`, and each recorded block hands on ``ref[name]`` (the reference's
    output of that block) instead of its own: every block then runs on the reference's inputs."""
    old = [c.replay for c in cells]
    for c in cells:
        c.replay = ref
    try:
        with capture_activations(*cells) as acts:
            yield acts
    finally:
        for c, o in zip(cells, old):
            c.replay = o


def full_param_names(cell: nn.Cell) -> dict[str, Parameter]:
    """Name -> Parameter as :func:`mindspore.load_param_into_net` sees them (``Parameter.name``)."""
    return {p.name: p for p in cell.get_parameters()}


# --------------------------------------------------------------------------- basic layers

class Linear(nn.Cell):
    """``nn.Dense``-compatible (params ``weight`` (out, in), ``bias``) with optional unmerged LoRA.

    With LoRA (see :mod:`.lora`): ``y = x W^T + b + scale * (x A^T) B^T`` where the child
    cells ``lora_A`` (weight (r, in)) and ``lora_B`` (weight (out, r)) are plain
    bias-free :class:`Linear` cells, as in MindONE's ``gm.modules.lora.layers.Dense``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = _param((out_features, in_features), "weight")
        self.has_bias = bool(bias)
        self.bias = _param((out_features,), "bias") if bias else None
        self.lora_A = None
        self.lora_B = None
        self.lora_scale = 0.0
        self.lora_merged = False
        self._matmul = ops.MatMul(transpose_b=True)

    def _plain(self, x: Tensor, weight: Tensor, bias) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]) if len(shape) != 2 else x
        y = self._matmul(x2, weight.astype(x2.dtype))
        if bias is not None:
            y = y + bias.astype(y.dtype)
        if len(shape) != 2:
            y = y.reshape(shape[:-1] + (y.shape[-1],))
        return y

    def construct(self, x: Tensor) -> Tensor:
        y = self._plain(x, self.weight, self.bias)
        if self.lora_A is not None and not self.lora_merged:
            y = y + self.lora_B(self.lora_A(x)) * self.lora_scale
        return y

    def extend_repr(self):
        lora = "" if self.lora_A is None else f", lora_r={self.lora_A.out_features}"
        return f"in={self.in_features}, out={self.out_features}, bias={self.has_bias}{lora}"


class Conv2d(nn.Cell):
    """2-D convolution with PyTorch semantics (symmetric zero padding, stride, NCHW).

    Params ``weight`` (out, in, k, k) and ``bias`` like ``mindspore.nn.Conv2d``.  The default
    ``impl="im2col"`` gathers the k*k windows with one Im2Col (``ops.unfold``) and does one
    MatMul: MindSpore 2.10's CPU Conv2D kernel is 20-100x slower than that, and the result
    is as accurate (float32 sums of the same products).  ``impl="native"`` uses ``ops.conv2d``
    (switch a built model with :func:`set_conv_impl`).

    With a LoCon LoRA (see :mod:`.lora`): ``y = conv(x) + scale * conv1x1_B(conv_A(x))``, where
    the children ``lora_A`` (weight (r, in, k, k): the base kernel, stride and padding, no bias)
    and ``lora_B`` (weight (out, r, 1, 1), no bias) are themselves :class:`Conv2d` cells, so the
    LoRA path runs through the same convolution implementation as the base (im2col or native).
    This is the PEFT / diffusers / kohya LoCon formulation.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
                 impl: str = "im2col", bias: bool = True):
        super().__init__()
        self.cin, self.cout, self.kernel, self.stride = int(cin), int(cout), int(kernel), int(stride)
        self.padding = kernel // 2 if padding is None else int(padding)
        if impl not in ("im2col", "native"):
            raise ValueError(f"unknown conv impl {impl!r}")
        self.impl = impl
        self.weight = _param((cout, cin, kernel, kernel), "weight")
        self.has_bias = bool(bias)
        self.bias = _param((cout,), "bias") if bias else None
        self.lora_A = None
        self.lora_B = None
        self.lora_scale = 0.0
        self.lora_merged = False

    def _conv(self, x: Tensor) -> Tensor:
        if self.impl == "native":
            y = ops.conv2d(x, self.weight.astype(x.dtype), None, self.stride, "pad", self.padding)
            if self.bias is not None:
                y = y + self.bias.astype(y.dtype).reshape(1, -1, 1, 1)
            return y
        b, c, h, w = x.shape
        k, s, p = self.kernel, self.stride, self.padding
        ho = (h + 2 * p - k) // s + 1
        wo = (w + 2 * p - k) // s + 1
        if k == 1 and s == 1 and p == 0:
            col = x.reshape(b, c, h * w)
        else:
            # Im2Col kernel: (B, C*k*k, Ho*Wo) in (c, i, j) order, the weight's own order.  One
            # op instead of k*k strided slices + stack (CPU StridedSlice costs ~0.3 ms each)
            col = ops.unfold(x, k, 1, p, s)
        # (Cout, C*k*k) @ (B, C*k*k, Ho*Wo) -> (B, Cout, Ho*Wo): NCHW out, no transposes
        wmat = self.weight.astype(x.dtype).reshape(self.cout, c * k * k)
        y = ops.matmul(wmat, col)
        if self.bias is not None:
            y = y + self.bias.astype(x.dtype).reshape(1, self.cout, 1)
        return y.reshape(b, self.cout, ho, wo)

    def construct(self, x: Tensor) -> Tensor:
        y = self._conv(x)
        if self.lora_A is not None and not self.lora_merged:
            y = y + self.lora_B(self.lora_A(x)) * self.lora_scale
        return y

    def extend_repr(self):
        lora = "" if self.lora_A is None else f", lora_r={self.lora_A.cout}"
        return (f"{self.cin}->{self.cout}, k={self.kernel}, stride={self.stride}, "
                f"padding={self.padding}, impl={self.impl}{lora}")


def make_conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
              bias: bool = True) -> Conv2d:
    """A model convolution: MindSpore's kernel under the ``conv_kernel`` numerics point (as ``gm``'s
    ``nn.Conv2d``), else :data:`CONV_IMPL`."""
    impl = "native" if _nx.uses("conv_kernel") else CONV_IMPL
    return Conv2d(cin, cout, kernel, stride, padding, impl=impl, bias=bias)


# "im2col" (fast, default) or "native" (MindSpore's Conv2D kernel); read when cells are built
CONV_IMPL = "im2col"


def set_conv_impl(cell: nn.Cell, impl: str) -> int:
    """Switch every :class:`Conv2d` in ``cell`` to ``impl`` ("im2col" or "native") in place, weights
    untouched; returns how many there are.  (A graph-mode cell recompiles on its next call.)"""
    if impl not in ("im2col", "native"):
        raise ValueError(f"unknown conv impl {impl!r}")
    convs = [c for _, c in cell.cells_and_names() if isinstance(c, Conv2d)]
    for c in convs:
        c.impl = impl
    return len(convs)


class GroupNorm(nn.Cell):
    """GroupNorm over (N, C, *); params ``gamma``/``beta``.

    Computed in float32 (diffusers), or under the ``compute_dtype`` numerics point in the input's
    dtype with gamma/beta cast to it, as MindSpore's ``nn.GroupNorm`` (``gm``) does."""

    NUMERICS_POINTS = ("compute_dtype",)

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.gamma = _param((num_channels,), "gamma", "ones")
        self.beta = _param((num_channels,), "beta", "zeros")
        _nx.stamp(self, self.NUMERICS_POINTS)

    def construct(self, x: Tensor) -> Tensor:
        if self.mindone_compute_dtype:
            return ops.group_norm(x, self.num_groups, self.gamma.astype(x.dtype), self.beta.astype(x.dtype),
                                  self.eps)
        dtype = x.dtype
        y = ops.group_norm(x.astype(ms.float32), self.num_groups, self.gamma.astype(ms.float32),
                          self.beta.astype(ms.float32), self.eps)
        return y.astype(dtype)

    def extend_repr(self):
        return f"groups={self.num_groups}, channels={self.num_channels}, eps={self.eps}"


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis; params ``gamma``/``beta``; computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = int(dim)
        self.eps = float(eps)
        self.gamma = _param((dim,), "gamma", "ones")
        self.beta = _param((dim,), "beta", "zeros")
        self._ln = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)

    def construct(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        y = self._ln(x.astype(ms.float32), self.gamma.astype(ms.float32), self.beta.astype(ms.float32))[0]
        return y.astype(dtype)

    def extend_repr(self):
        return f"dim={self.dim}, eps={self.eps}"


class Embedding(nn.Cell):
    """Token lookup; param ``embedding_table`` (vocab, dim) as in ``mindspore.nn.Embedding``."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.embedding_table = _param((num, dim), "embedding_table")

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.embedding_table, ids.astype(ms.int32), 0)


class SiLU(nn.Cell):
    """The UNet's SiLU: ``x * sigmoid(x)``, or MindSpore's SiLU kernel (``gm``'s ``nn.SiLU``) under
    the ``silu_kernel`` numerics point (bitwise the same on CPU, MindSpore 2.10)."""

    NUMERICS_POINTS = ("silu_kernel",)

    def __init__(self):
        super().__init__()
        _nx.stamp(self, self.NUMERICS_POINTS)

    def construct(self, x):
        if self.mindone_silu_kernel:
            return ops.silu(x)
        return x * ops.sigmoid(x)


class Identity(nn.Cell):
    def construct(self, x):
        return x


def gelu(x: Tensor, mindone: bool = False) -> Tensor:
    """Exact (erf) GELU: torch's formula ``x * 0.5 * (1 + erf(x * 1/sqrt(2)))``, or with ``mindone``
    MindSpore's ``ops.gelu(x, "none")`` = ``x * (erf(x / sqrt(2)) + 1) * 0.5`` (``gm``'s GEGLU and
    OpenCLIP MLP; the ``gelu_formula`` numerics point)."""
    if mindone:
        return ops.gelu(x, approximate="none")
    return x * 0.5 * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: Tensor) -> Tensor:
    """Tanh-approximated GELU, MindSpore's ``nn.GELU()`` default (``gm``'s CLIP-L activation)."""
    return ops.gelu(x, approximate="tanh")


def quick_gelu(x: Tensor) -> Tensor:
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu, "silu": lambda x: x * ops.sigmoid(x)}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (known: {', '.join(ACTIVATIONS)})") from None


def apply_activation(x: Tensor, name: str, mindone_gelu: bool = False, gm_hf_clip: bool = False) -> Tensor:
    """The text encoders' MLP activation ``name`` (graph-mode safe: flags are constants).

    ``gm_hf_clip``: as ``gm``'s HF-CLIP port, whose ``ACT2FN`` maps ``"gelu"`` and ``"quick_gelu"`` to
    ``nn.GELU()`` (tanh approximation).  ``mindone_gelu``: exact GELU via ``ops.gelu`` (see :func:`gelu`).
    """
    if gm_hf_clip and (name == "gelu" or name == "quick_gelu"):
        return gelu_tanh(x)
    if name == "gelu":
        return gelu(x, mindone_gelu)
    if name == "quick_gelu":
        return quick_gelu(x)
    return x * ops.sigmoid(x)


# attention score scaling: "mul" scores * (1/sqrt(d)) (the port's diffusers mode); "div" scores / sqrt(d)
# (gm's scaled_dot_product_attention: UNet and VAE); "q" q * d**-0.5 before q @ k^T (gm's CLIP-L, OpenCLIP)
SCALES = ("mul", "div", "q")


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None, scale: str = "mul",
              softmax_fp32: bool = True) -> Tensor:
    """Multi-head scaled dot-product attention on (B, L, heads*d) tensors, scale 1/sqrt(d) applied as
    ``scale`` says (see :data:`SCALES`); softmax in float32, or in the scores' dtype without
    ``softmax_fp32`` (``gm``)."""
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    if scale == "q":
        q = q * (d ** -0.5)
    q = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    scores = ops.matmul(q, k.transpose(0, 1, 3, 2))
    if scale == "mul":
        scores = scores * (1.0 / math.sqrt(d))
    elif scale == "div":
        scores = scores / (d ** 0.5)
    if mask is not None:
        scores = scores + mask
    if softmax_fp32:
        probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
    else:
        probs = ops.softmax(scores, axis=-1).astype(v.dtype)
    out = ops.matmul(probs, v)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner)


# gm's text encoders mask with -1e5 (CLIP-L: MIN_VALUE; OpenCLIP: build_attention_mask), not -inf
GM_MASK_VALUE = -1e5


def causal_mask(length: int, dtype=ms.float32, fill: float = -np.inf) -> Tensor:
    """(length, length) additive causal mask: 0 on and below the diagonal, ``fill`` above."""
    m = np.triu(np.full((length, length), fill, dtype=np.float32), k=1)
    return Tensor(m, dtype)


def upsample_nearest2x(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 on NCHW (exact copy, like ``F.interpolate(scale_factor=2.0, mode="nearest")``)."""
    b, c, h, w = x.shape
    y = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2))
    return y.reshape(b, c, h * 2, w * 2)


class Upsample(nn.Cell):
    """Nearest-neighbour x2 then a 3x3 conv (``.conv``): the UNet's and the VAE decoder's upsampler."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = make_conv(channels, channels, 3)

    def construct(self, x):
        return self.conv(upsample_nearest2x(x))


# --------------------------------------------------------------------------- numerics of built cells

def apply_numerics(cell, mode: "str | _nx.Numerics | None" = None) -> int:
    """Re-stamp every sub-cell of a built ``cell`` with ``mode`` (default: the selection in force);
    returns how many cells have a numerics point.  Convolutions get MindSpore's kernel under
    ``conv_kernel`` and the port's default implementation otherwise.  A graph-mode cell
    recompiles on its next call (the stamps are part of its structure key)."""
    nx = _nx.resolve(mode)
    n = 0
    for _, c in cell.cells_and_names():
        pts = getattr(type(c), "NUMERICS_POINTS", ())
        if pts:
            _nx.stamp(c, pts, nx)
            n += 1
        if isinstance(c, Conv2d):
            c.impl = "native" if nx.uses("conv_kernel") else CONV_IMPL
    return n
