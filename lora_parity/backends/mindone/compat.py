"""CPU stand-ins for the ``mindspore.mint`` ops MindONE's SDXL code calls that MindSpore 2.10
has no CPU kernel for.

``mindone.diffusers`` 0.5.0 is written against ``mindspore.mint`` (the Ascend "ext" kernels).
On a CPU build of MindSpore 2.10 a dozen of them fail at launch with
``RuntimeError: The kernel <Name> unregistered`` (``mint.einsum`` refuses with
"einsum only supports Ascend").  :data:`CPU_COMPAT` lists each one -- the kernel named in the
error, the attribute(s) rebound, the replacement and why -- and :func:`apply_cpu_compat`
rebinds them, on CPU only, to functions built from ``mindspore.ops`` primitives that do have CPU
kernels, with mint's signature and semantics (keyword names, defaults, dtype rules).  Model code,
weight loading and the LoRA loader stay MindONE's: only these ops are rerouted.

Where the rebinding has to happen (from reading mindone 0.5.0 and mindspore 2.10):

* MindONE calls ops through the module at call time (``mint.arange(...)``,
  ``mint.nn.functional.gelu(...)``, ``F.pad`` with ``F = mindspore.mint.nn.functional``), so
  rebinding the module attribute reaches those calls.
* The layer classes bind a kernel internally: ``mint.nn.Conv2d`` keeps ``conv2d_ext_op`` on the
  instance and ``mint.nn.LayerNorm`` (= ``mindspore.nn.LayerNormExt``) calls ``ops.layer_norm``;
  their ``construct`` is replaced on the class, which reaches every instance, old or new.
  ``mint.nn.GELU`` calls ``F.gelu`` at call time and follows the functional.
* A few names are bound once, at import or construction: ``mindone.diffusers.models.layers_compat``
  does ``pad = ms.mint.nn.functional.pad``; transformers' ``GELUActivation`` stores
  ``self.act = mint.nn.functional.gelu`` in ``__init__``.  Modules imported after
  :func:`apply_cpu_compat` pick up the replacement by themselves; for ``mindone`` modules already
  imported, :func:`apply_cpu_compat` rebinds any module-level name still bound to a replaced
  original.  Objects built before the call keep what they stored, so call it before
  ``from_pretrained``.

Everything here is meant for PyNative mode (MindONE's inference path): the replacements read
Python scalars out of 0-d tensors where mint accepts them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import sys
import threading
from typing import Callable, Optional

import mindspore as ms
from mindspore import Tensor, ops

__all__ = ["CompatEntry", "CPU_COMPAT", "apply_cpu_compat", "patched", "remove_cpu_compat", "original"]

_HALF = (ms.float16, ms.bfloat16)
_ARANGE_DTYPES = (ms.int32, ms.int64, ms.float16, ms.float32, ms.float64, ms.bfloat16)  # as mint's Arange


def original(target: str):
    """The object ``target`` named before this layer rebound it (the live attribute if unpatched)."""
    with _LOCK:
        if target in _ACTIVE:
            return _ACTIVE[target].original
    owner, name = _resolve(target)
    return getattr(owner, name)


def _scalar(value):
    """A Python number from a number or a one-element tensor (mint accepts both)."""
    if isinstance(value, Tensor):
        if value.size != 1:
            raise ValueError(f"expected a scalar or a one-element tensor, got shape {value.shape}")
        return value.item()
    return value


def _pair(value, name: str) -> tuple:
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * 2
    if len(value) != 2:
        raise ValueError(f"conv2d: {name} must be an int or a pair, got {value}")
    return value


def _f64(value: float) -> Tensor:
    # A Python float meeting a float64 tensor is rounded to float32 first; a float64 scalar is not.
    return Tensor(float(value), ms.float64)


def _upcast(x: Tensor) -> Tensor:
    return x.astype(ms.float32) if x.dtype in _HALF else x


# --------------------------------------------------------------------------- replacements

def gelu(input, approximate="none"):
    """``mint.nn.functional.gelu``: exact ``x/2 * (1 + erf(x/sqrt 2))`` or the tanh form
    ``x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``.

    Computed in float64 and rounded to the input dtype: MindSpore's float32 CPU ``tanh`` is off by
    up to 1e-4 (it returns |tanh| > 1 near x = -5), its float64 kernels are accurate.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    x = input.astype(ms.float64)
    if approximate == "none":
        y = _f64(0.5) * x * (_f64(1.0) + ops.erf(x * _f64(1.0 / math.sqrt(2.0))))
    else:
        inner = _f64(math.sqrt(2.0 / math.pi)) * (x + _f64(0.044715) * x * x * x)
        y = _f64(0.5) * x * (_f64(1.0) + ops.tanh(inner))
    return y.astype(input.dtype)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05):
    """``mint.nn.functional.layer_norm``: normalise over the trailing ``normalized_shape`` dims
    with the biased variance, then ``* weight + bias`` (each optional)."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    normalized_shape = tuple(int(d) for d in normalized_shape)
    k = len(normalized_shape)
    if k == 0 or k > input.ndim or tuple(input.shape[-k:]) != normalized_shape:
        raise ValueError(f"layer_norm: normalized_shape {normalized_shape} does not match the trailing "
                         f"dimensions of an input of shape {input.shape}")
    axes = tuple(range(input.ndim - k, input.ndim))
    x = _upcast(input)
    centred = x - ops.mean(x, axes, keep_dims=True)
    var = ops.mean(centred * centred, axes, keep_dims=True)
    y = centred * ops.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(y.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(input.dtype)


def _layer_norm_construct(self, input):
    """``mint.nn.LayerNorm.construct`` (``nn.LayerNormExt``) through :func:`layer_norm`."""
    return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


@functools.lru_cache(maxsize=256)
def _conv2d_primitive(out_channel, kernel, pad, stride, dilation, group):
    return ops.Conv2D(out_channel=out_channel, kernel_size=kernel, mode=1, pad_mode="pad", pad=pad,
                      stride=stride, dilation=dilation, group=group)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``mint.nn.functional.conv2d`` (cross-correlation, NCHW or unbatched CHW input) through the
    ``ops.Conv2D`` primitive with explicit padding; ``padding`` is an int, a pair, ``'valid'`` or
    ``'same'`` (stride 1; an odd total puts the extra row/column at the bottom/right)."""
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("conv2d: padding='same' is not supported for strided convolutions")
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise ValueError(f"conv2d: padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    else:
        ph, pw = _pair(padding, "padding")
        pad = (ph, ph, pw, pw)
    unbatched = input.ndim == 3
    if unbatched:
        input = input.expand_dims(0)
    if input.ndim != 4:
        raise ValueError(f"conv2d: expected a 3-D or 4-D input, got shape {input.shape}")
    prim = _conv2d_primitive(int(weight.shape[0]), (kh, kw), pad, stride, dilation, int(groups))
    out = prim(input, weight)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1).astype(out.dtype)
    return out.squeeze(0) if unbatched else out


def _conv2d_construct(self, input):
    """``mint.nn.Conv2d.construct`` through :func:`conv2d`; a non-zeros ``padding_mode`` keeps
    mint's own path (which pads with a non-constant mode first)."""
    if self.padding_mode != "zeros":
        return original("mindspore.mint.nn.Conv2d.construct")(self, input)
    return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def arange(start=0, end=None, step=1, *, dtype=None):
    """``mint.arange``: ``start + i*step`` for ``0 <= i < ceil((end-start)/step)``; without
    ``dtype`` int64 when start, end and step are all integers, else float32."""
    if end is None:
        start, end = 0, start
    start, end, step = (_scalar(v) for v in (start, end, step))
    for v in (start, end, step):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"arange: start, end and step must be int or float, got {type(v).__name__}")
    if step == 0:
        raise ValueError("arange: step must be nonzero")
    if (end - start) * step < 0:
        raise ValueError(f"arange: upper bound and step sign are inconsistent (start={start}, end={end}, step={step})")
    if dtype is None:
        dtype = ms.int64 if all(isinstance(v, numbers.Integral) for v in (start, end, step)) else ms.float32
    if dtype not in _ARANGE_DTYPES:
        raise ValueError(f"arange: dtype must be one of int32, int64, float16, float32, float64, bfloat16; got {dtype}")
    n = int(math.ceil((end - start) / step))
    if n == 0:
        return ops.zeros((0,), dtype)
    idx = ops.arange(0, n, 1, dtype=ms.int64)
    if all(isinstance(v, numbers.Integral) for v in (start, step)):
        return (idx * int(step) + int(start)).astype(dtype)
    return (idx.astype(ms.float64) * _f64(step) + _f64(start)).astype(dtype)


def pad(input, pad, mode="constant", value=None):
    """``mint.nn.functional.pad``: constant mode through ``ops.pad`` (pairs from the last dim
    backwards, negative pads crop, ``value`` defaults to 0); any other mode goes to mint's own."""
    if mode != "constant":
        return original("mindspore.mint.nn.functional.pad")(input, pad, mode=mode, value=value)
    if not isinstance(input, Tensor):
        raise TypeError(f"pad: input must be a Tensor, got {type(input).__name__}")
    pads = tuple(int(p) for p in pad)
    if not pads:
        return input
    if len(pads) % 2 or len(pads) // 2 > input.ndim:
        raise ValueError(f"pad: padding length {len(pads)} must be even and at most 2*ndim ({2 * input.ndim})")
    if min(pads) < 0:  # crop by slicing (ops.pad's own negative padding is unreliable on CPU)
        index = [slice(None)] * input.ndim
        for d in range(len(pads) // 2):
            axis, lo, hi = input.ndim - 1 - d, pads[2 * d], pads[2 * d + 1]
            size = input.shape[axis]
            index[axis] = slice(max(-lo, 0), size - max(-hi, 0))
            if size - max(-lo, 0) - max(-hi, 0) < 0:
                raise ValueError(f"pad: negative padding {pads} removes more than dimension {axis} holds")
        input = input[tuple(index)]
        pads = tuple(max(p, 0) for p in pads)
        if not any(pads):
            return input
    return ops.pad(input, pads, mode="constant", value=0 if value is None else value)


def stack(tensors, dim=0):
    """``mint.stack``: join equal-shaped tensors along a new dimension ``dim``."""
    return ops.stack(tuple(tensors), int(dim))


def zeros_like(input, *, dtype=None):
    """``mint.zeros_like``: zeros with ``input``'s shape and ``dtype`` (default: ``input``'s)."""
    return ops.zeros_like(input, dtype=dtype)


def full(size, fill_value, *, dtype=None):
    """``mint.full``: ``size`` filled with ``fill_value``; without ``dtype`` the dtype follows the
    value (a tensor's dtype; bool -> bool, int -> int64, float -> float32)."""
    if isinstance(size, numbers.Integral):
        size = (int(size),)
    if not isinstance(size, (tuple, list)):
        raise TypeError(f"full: size must be a tuple or list, got {type(size).__name__}")
    size = tuple(int(s) for s in size)
    if any(s < 0 for s in size):
        raise ValueError(f"full: negative dimension in size {size}")
    if isinstance(fill_value, Tensor):
        if fill_value.size != 1:
            raise ValueError(f"full: a tensor fill_value must have one element, got shape {fill_value.shape}")
        value_dtype = fill_value.dtype
        fill_value = fill_value.reshape(())
    elif isinstance(fill_value, bool):
        value_dtype = ms.bool_
    elif isinstance(fill_value, numbers.Integral):
        value_dtype = ms.int64
    elif isinstance(fill_value, numbers.Real):
        value_dtype = ms.float32
    else:
        raise TypeError(f"full: fill_value must be a number or a one-element tensor, got {type(fill_value).__name__}")
    return ops.fill(dtype if dtype is not None else value_dtype, size, fill_value)


def outer(input, vec2):
    """``mint.outer``: ``out[i, j] = input[i] * vec2[j]`` for 1-D inputs."""
    if input.ndim != 1 or vec2.ndim != 1:
        raise ValueError(f"outer: expected 1-D inputs, got shapes {input.shape} and {vec2.shape}")
    return input.reshape(-1, 1) * vec2.reshape(1, -1)


def linspace(start, end, steps, *, dtype=None):
    """``mint.linspace``: ``steps`` (> 0) evenly spaced values from ``start`` to ``end`` inclusive
    (computed in float64 from both ends, so both endpoints are exact; default dtype float32)."""
    start, end, steps = float(_scalar(start)), float(_scalar(end)), _scalar(steps)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps <= 0:
        raise ValueError(f"linspace: steps must be a positive int (as mint's LinSpaceExt), got {steps!r}")
    dtype = ms.float32 if dtype is None else dtype
    steps = int(steps)
    if steps == 1:
        return ops.fill(ms.float64, (1,), _f64(start)).astype(dtype)
    step = _f64((end - start) / (steps - 1))
    idx = ops.arange(0, steps, 1, dtype=ms.int64).astype(ms.float64)
    from_start = idx * step + _f64(start)
    from_end = _f64(end) - (_f64(steps - 1) - idx) * step
    return ops.where(idx < steps // 2, from_start, from_end).astype(dtype)


def baddbmm(input, batch1, batch2, *, beta=1, alpha=1):
    """``mint.baddbmm``: ``beta * input + alpha * (batch1 @ batch2)``; with ``beta == 0`` the input
    is ignored (so NaN or inf in it does not propagate)."""
    out = ops.bmm(batch1, batch2)
    if alpha != 1:
        out = out * alpha
    if beta == 0:
        return out
    return out + (input if beta == 1 else input * beta).astype(out.dtype)


def _int_repeats(repeats) -> Optional[int]:
    if isinstance(repeats, bool):
        raise TypeError("repeat_interleave: repeats must be an int or a tensor of ints")
    if isinstance(repeats, numbers.Integral):
        return int(repeats)
    if isinstance(repeats, Tensor):
        return int(repeats.item()) if repeats.size == 1 else None
    if isinstance(repeats, (tuple, list)):
        return int(repeats[0]) if len(repeats) == 1 else None
    raise TypeError(f"repeat_interleave: repeats must be an int or a tensor of ints, got {type(repeats).__name__}")


def repeat_interleave(input, repeats, dim=None, *, output_size=None):
    """``mint.repeat_interleave`` with one repeat count: each element repeated ``repeats`` times
    along ``dim`` (the flattened input when ``dim`` is None).  Per-element repeat counts keep
    mint's own kernel (``RepeatInterleaveTensor``)."""
    r = _int_repeats(repeats)
    if r is None:
        return original("mindspore.mint.repeat_interleave")(input, repeats, dim, output_size=output_size)
    if r < 0:
        raise ValueError(f"repeat_interleave: repeats must be non-negative, got {r}")
    x = input.reshape(-1) if dim is None or input.ndim == 0 else input
    d = 0 if dim is None else int(dim) % max(x.ndim, 1)
    shape = tuple(x.shape)
    new_shape = shape[:d] + (shape[d] * r,) + shape[d + 1:]
    if output_size is not None and int(output_size) != new_shape[d]:
        raise ValueError(f"repeat_interleave: output_size {output_size} != {new_shape[d]}")
    if r == 0 or 0 in shape:
        return ops.zeros(new_shape, x.dtype)
    expanded = ops.broadcast_to(x.expand_dims(d + 1), shape[:d + 1] + (r,) + shape[d + 1:])
    return expanded.reshape(new_shape)


def _tensor_repeat_interleave(self, repeats, dim=None, *, output_size=None):
    """``Tensor.repeat_interleave`` (the method MindONE's rotary embeddings call) through
    :func:`repeat_interleave`; per-element repeat counts keep the tensor's own method, called with only the
    arguments given: the method picks its kernel by signature, and an explicit ``output_size=None`` sends it to
    ``RepeatInterleaveTensor`` (no CPU kernel) where the plain call has one."""
    if _int_repeats(repeats) is None:
        args = (repeats,) if dim is None else (repeats, dim)
        kwargs = {} if output_size is None else {"output_size": output_size}
        return original("mindspore.Tensor.repeat_interleave")(self, *args, **kwargs)
    return repeat_interleave(self, repeats, dim, output_size=output_size)


def _einsum_from_sublists(args):
    """(op, sublist, op, sublist, ..., [out]) -> (equation, operands), as mint accepts."""
    def letters(sub):
        out = []
        for s in sub:
            if s is Ellipsis:
                out.append("...")
            elif isinstance(s, numbers.Integral) and 0 <= s < 52:
                out.append("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[s])
            else:
                raise ValueError(f"einsum: sublist entries must be Ellipsis or ints in [0, 52), got {s!r}")
        return "".join(out)
    args = list(args)
    out_sub = args.pop() if len(args) % 2 else None
    operands, terms = args[0::2], [letters(s) for s in args[1::2]]
    return ",".join(terms) + ("" if out_sub is None else "->" + letters(out_sub)), operands


def einsum(equation, *operands):
    """``mint.einsum``: permutations, broadcast products and sums over the labels left out of the
    output, with ``...``, implicit output and the sublist form; operands are aligned to one label
    order, multiplied with broadcasting and summed.  A label repeated inside one operand (a
    diagonal) is refused."""
    if not isinstance(equation, str):
        equation, operands = _einsum_from_sublists((equation,) + operands)
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = tuple(operands[0])
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise ValueError(f"einsum: {len(terms)} operand subscripts but {len(operands)} operands")
    parsed = []
    for term, op in zip(terms, operands):
        pre, ell, post = term.partition("...")
        n_ell = op.ndim - len(pre) - len(post) if ell else 0
        if (not ell and len(term) != op.ndim) or n_ell < 0:
            raise ValueError(f"einsum: subscripts {term!r} do not fit an operand of rank {op.ndim}")
        if not (pre + post).isalpha() and (pre + post):
            raise ValueError(f"einsum: invalid subscripts {term!r}")
        parsed.append((list(pre), n_ell, list(post)))
    n_ell_max = max((n for _, n, _ in parsed), default=0)
    ell_labels = [("...", i) for i in range(n_ell_max)]
    op_labels = []
    for pre, n, post in parsed:
        labels = pre + ell_labels[n_ell_max - n:] + post
        if len(set(labels)) != len(labels):
            raise NotImplementedError("einsum: a label repeated inside one operand (diagonal) is not supported")
        op_labels.append(labels)
    if arrow:
        pre, ell, post = rhs.partition("...")
        out_labels = list(pre) + (ell_labels if ell else []) + list(post)
    else:
        counts = {}
        for labels in op_labels:
            for lab in labels:
                if isinstance(lab, str):
                    counts[lab] = counts.get(lab, 0) + 1
        out_labels = ell_labels + sorted(lab for lab, c in counts.items() if c == 1)
    seen = [lab for labels in op_labels for lab in labels]
    if len(set(out_labels)) != len(out_labels) or any(lab not in seen for lab in out_labels):
        raise ValueError(f"einsum: invalid output subscripts in {equation!r}")
    order = list(out_labels)
    for lab in seen:
        if lab not in order:
            order.append(lab)
    product = None
    for op, labels in zip(operands, op_labels):
        perm = tuple(sorted(range(len(labels)), key=lambda i: order.index(labels[i])))
        t = ops.transpose(op, perm) if perm != tuple(range(len(labels))) else op
        shape = [1] * len(order)
        for i in perm:
            shape[order.index(labels[i])] = op.shape[i]
        t = t.reshape(tuple(shape))
        product = t if product is None else product * t
    contracted = tuple(range(len(out_labels), len(order)))
    if contracted:
        product = ops.sum(product, dim=contracted)
    out_shape = []
    for lab in out_labels:
        sizes = [op.shape[labels.index(lab)] for op, labels in zip(operands, op_labels) if lab in labels]
        out_shape.append(max(sizes))
    if tuple(product.shape) != tuple(out_shape):
        product = ops.broadcast_to(product, tuple(out_shape))
    return product


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False):
    """``mint.nn.functional.embedding``: row ``input[...]`` of ``weight`` for every index.

    ``padding_idx`` and ``scale_grad_by_freq`` only shape gradients, so a forward pass ignores them;
    ``max_norm`` renormalises ``weight`` in place, which inference code never asks for (refused)."""
    if max_norm is not None:
        raise NotImplementedError("embedding: max_norm (in-place renormalisation) is not supported on CPU")
    if input.dtype not in (ms.int32, ms.int64):
        raise TypeError(f"embedding: indices must be int32 or int64, got {input.dtype}")
    n = weight.shape[0]
    if padding_idx is not None and not -n <= int(padding_idx) < n:
        raise ValueError(f"embedding: padding_idx {padding_idx} out of range for {n} rows")
    flat = input.reshape(-1)
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= n):
        raise IndexError(f"embedding: an index is out of range for {n} rows")
    return ops.gather(weight, flat, 0).reshape(tuple(input.shape) + tuple(weight.shape[1:]))


def _embedding_construct(self, input):
    """``mint.nn.Embedding.construct`` (``nn.EmbeddingExt``) through :func:`embedding`."""
    return embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq)


class FlashAttentionScore:
    """``ops.operations.nn_ops.FlashAttentionScore`` (Ascend only) as plain attention, same contract.

    MindONE's ``layers_compat.scaled_dot_product_attention`` (Flux's attention dispatch) always ends in
    this kernel: it casts float32 query / key / value to float16 first and the output back (its math
    branch is computed, then overwritten).  The stand-in keeps that contract: it takes the float16
    inputs it is given, computes ``softmax(q k^T * scale, masked) v`` in float32 (as the kernel
    accumulates) and returns the output in the inputs' dtype, at index 3 of the kernel's outputs.
    ``attn_mask`` True means *discard* (MindSpore's convention), shaped (S1, S2), (B, 1, S1, S2) or
    (B, N, S1, S2) as the kernel's.  Layouts BNSD and BSH (one head)."""

    def __init__(self, head_num=1, keep_prob=1.0, scale_value=1.0, pre_tokens=2147483647, next_tokens=2147483647,
                 inner_precise=0, input_layout="BSH", sparse_mode=0):
        if input_layout not in ("BNSD", "BSH"):
            raise NotImplementedError(f"FlashAttentionScore: layout {input_layout} is not supported on CPU")
        if float(keep_prob) != 1.0:
            raise NotImplementedError("FlashAttentionScore: dropout (keep_prob < 1) is not supported on CPU")
        self.head_num, self.scale, self.layout = int(head_num), float(scale_value), input_layout

    def __call__(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
                 prefix=None):
        if real_shift is not None or drop_mask is not None or padding_mask is not None or prefix is not None:
            raise NotImplementedError("FlashAttentionScore: only query, key, value and attn_mask on CPU")
        q, k, v = (t.astype(ms.float32) for t in (query, key, value))
        if self.layout == "BSH":
            if self.head_num != 1:
                raise NotImplementedError("FlashAttentionScore: BSH with several heads is not supported on CPU")
            q, k, v = (t.expand_dims(1) for t in (q, k, v))
        scores = ops.matmul(q, k.swapaxes(-2, -1)) * self.scale
        if attn_mask is not None:
            discard = attn_mask.astype(ms.bool_)
            if discard.ndim == 2:  # (S1, S2): one mask for every batch and head
                discard = discard.reshape((1, 1) + tuple(discard.shape))
            elif discard.ndim != 4:  # the kernel takes (S1, S2), (B, 1, S1, S2) or (B, N, S1, S2)
                raise ValueError(f"FlashAttentionScore: attn_mask must be 2-D or 4-D, got shape {attn_mask.shape}")
            scores = ops.masked_fill(scores, ops.broadcast_to(discard, scores.shape), float("-inf"))
        scores = scores - ops.amax(scores, -1, keepdims=True)
        weights = ops.exp(scores)
        out = ops.matmul(weights / ops.sum(weights, -1, keepdim=True), v)
        if self.layout == "BSH":
            out = out.squeeze(1)
        return (None, None, None, out.astype(query.dtype))


# --------------------------------------------------------------------------- the table

@dataclasses.dataclass(frozen=True)
class CompatEntry:
    """One op MindSpore 2.10 cannot run on CPU, and how this layer reroutes it."""

    kernel: str                                   # the name in "The kernel <kernel> unregistered"
    patches: tuple[tuple[str, Callable], ...]     # (dotted attribute rebound, replacement)
    why: str

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.patches)


_M, _F = "mindspore.mint.", "mindspore.mint.nn.functional."

# "SDXL:" = reached by MindONE's SDXL txt2img + LoRA path (tiny fixture, counted); the rest are
# mint calls in MindONE code that SDXL txt2img does not reach, kept so those paths run too.
CPU_COMPAT: tuple[CompatEntry, ...] = (
    CompatEntry("GeluExt", ((_F + "gelu", gelu),),
                "SDXL: CLIP-bigG MLP (GELUActivation binds F.gelu in __init__) and the UNet's GEGLU; "
                "mint.nn.GELU calls F.gelu at call time, so it follows"),
    CompatEntry("LayerNormExt", ((_F + "layer_norm", layer_norm),
                                 (_M + "nn.LayerNorm.construct", _layer_norm_construct)),
                "SDXL: UNet transformer-block norms; mint.nn.LayerNorm (= nn.LayerNormExt) calls ops.layer_norm "
                "inside construct, so construct is replaced"),
    CompatEntry("Conv2DExt", ((_F + "conv2d", conv2d), (_M + "nn.Conv2d.construct", _conv2d_construct)),
                "SDXL: every UNet and VAE convolution; mint.nn.Conv2d keeps conv2d_ext_op on the instance, "
                "so construct is replaced"),
    CompatEntry("Arange", ((_M + "arange", arange),),
                "SDXL: get_timestep_embedding (UNet time_proj and add_time_proj)"),
    CompatEntry("ZerosLikeExt", ((_M + "zeros_like", zeros_like),),
                "SDXL: zero negative prompt embeds under classifier-free guidance (force_zeros_for_empty_prompt)"),
    CompatEntry("ConstantPadND", ((_F + "pad", pad),),
                "odd-dim timestep embeddings, Downsample2D(padding=0) in the VAE encoder, attention-mask padding"),
    CompatEntry("StackExt", ((_M + "stack", stack),),
                "image processor on image lists, IP-adapter embeds, sincos grids"),
    CompatEntry("FillScalar", ((_M + "full", full),),
                "-inf causal masks in layers_compat's math attention"),
    CompatEntry("Outer", ((_M + "outer", outer),),
                "FIR up/down-sampling kernels, 1-D sincos and rotary positions"),
    CompatEntry("LinSpaceExt", ((_M + "linspace", linspace),),
                "positional grids in embeddings (the Euler scheduler itself uses numpy)"),
    CompatEntry("Baddbmm", ((_M + "baddbmm", baddbmm),),
                "Attention.get_attention_scores when an attention mask is passed (SDXL passes none)"),
    CompatEntry("RepeatInterleaveInt", ((_M + "repeat_interleave", repeat_interleave),
                                        ("mindspore.Tensor.repeat_interleave", _tensor_repeat_interleave)),
                "Flux: get_1d_rotary_pos_embed interleaves cos/sin with the Tensor method; grouped key/value "
                "heads in attention processors"),
    CompatEntry("Einsum", ((_M + "einsum", einsum),),
                "mint.einsum raises 'einsum only supports Ascend': Transformer2DModel unpatchify of patched inputs"),
    CompatEntry("Embedding", ((_F + "embedding", embedding), (_M + "nn.Embedding.construct", _embedding_construct)),
                "SD3 / Flux: T5's token embedding and relative-position bias (mint.nn.Embedding = nn.EmbeddingExt "
                "calls ops.embedding inside construct, so construct is replaced)"),
    CompatEntry("FlashAttentionScore", (("mindspore.ops.operations.nn_ops.FlashAttentionScore", FlashAttentionScore),),
                "Flux: MindONE's attention dispatch (layers_compat.scaled_dot_product_attention) builds this kernel "
                "on every call, with float16 inputs even in a float32 pipeline; the stand-in keeps that"),
)

# --------------------------------------------------------------------------- patching


@dataclasses.dataclass
class _Patch:
    owner: object
    name: str
    original: object
    replacement: Callable
    owned: bool            # the attribute lived in owner.__dict__ (else inherited: delete to restore)
    kernel: str


_LOCK = threading.RLock()
_ACTIVE: dict[str, _Patch] = {}


def _resolve(target: str):
    """(object holding the attribute, attribute name) for a dotted path like
    ``mindspore.mint.nn.Conv2d.construct``: the longest importable module prefix, then getattr."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:-1]:
            obj = getattr(obj, p)
        if not hasattr(obj, parts[-1]):
            raise AttributeError(f"{target}: {type(obj).__name__} {obj!r} has no attribute {parts[-1]!r}")
        return obj, parts[-1]
    raise ImportError(f"{target}: no importable module prefix")


def _set(target: str, owner, name: str, replacement: Callable, kernel: str) -> None:
    owned = isinstance(owner, type) is False or name in vars(owner)
    current = vars(owner)[name] if isinstance(owner, type) and owned else getattr(owner, name)
    _ACTIVE[target] = _Patch(owner, name, current, replacement, owned, kernel)
    setattr(owner, name, replacement)


def _sweep_aliases() -> None:
    """Rebind module-level names in imported ``mindone`` modules that still hold a replaced original
    (e.g. ``layers_compat.pad = ms.mint.nn.functional.pad``, evaluated at import)."""
    replaced = {id(p.original): (p.replacement, p.kernel) for p in list(_ACTIVE.values())
                if not isinstance(p.owner, type)}
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "mindone" or mod_name.startswith("mindone.")):
            continue
        for name, value in list(vars(module).items()):
            hit = replaced.get(id(value))
            if hit is not None:
                target = f"{mod_name}.{name}"
                if target not in _ACTIVE:
                    _set(target, module, name, hit[0], hit[1])


def apply_cpu_compat(device_target: str) -> list[str]:
    """Reroute every :data:`CPU_COMPAT` op when ``device_target`` is ``"CPU"``.

    Idempotent; returns the dotted names this layer has rebound after the call (the same list
    when called again).  For any other target (``"Ascend"``, ``"GPU"``) nothing is touched and
    ``[]`` is returned.  Call it before building MindONE models.
    """
    if str(device_target).upper() != "CPU":
        return []
    with _LOCK:
        for entry in CPU_COMPAT:
            for target, replacement in entry.patches:
                if target in _ACTIVE:
                    continue
                owner, name = _resolve(target)
                _set(target, owner, name, replacement, entry.kernel)
        _sweep_aliases()
        return sorted(_ACTIVE)


def patched() -> dict[str, str]:
    """What is active now: ``{dotted name rebound: kernel it stands in for}``."""
    with _LOCK:
        return {target: p.kernel for target, p in sorted(_ACTIVE.items())}


def remove_cpu_compat() -> list[str]:
    """Put every original back (for tests); returns the names restored."""
    with _LOCK:
        restored = []
        for target in sorted(_ACTIVE, key=lambda t: t.count("."), reverse=True):
            p = _ACTIVE.pop(target)
            if getattr(p.owner, p.name, None) is p.replacement:
                if p.owned:
                    setattr(p.owner, p.name, p.original)
                else:
                    delattr(p.owner, p.name)
            restored.append(target)
        # mindone modules imported while patched bound the replacement themselves: unbind those too.
        originals = {}
        for entry in CPU_COMPAT:
            for target, replacement in entry.patches:
                owner, name = _resolve(target)
                originals[id(replacement)] = getattr(owner, name)
        for mod_name, module in list(sys.modules.items()):
            if module is None or not (mod_name == "mindone" or mod_name.startswith("mindone.")):
                continue
            for name, value in list(vars(module).items()):
                if id(value) in originals:
                    setattr(module, name, originals[id(value)])
        return sorted(restored)
