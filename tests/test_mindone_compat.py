"""The CPU stand-ins for MindONE's ``mindspore.mint`` ops (lora_parity.backends.mindone.compat).

Runs with MindSpore alone (no mindone needed: the mint ops are MindSpore's own).  Each table
entry's replacement is called through the patched attribute (``mindspore.mint``, a ``Tensor`` method,
an ``nn_ops`` primitive) and checked against a numpy reference written from the op's definition; where
mint's own kernel runs on this machine it is compared too.  The patching itself: only on CPU, idempotent, reversible, and every
table entry names an attribute MindSpore has.
"""
from __future__ import annotations

import math
import subprocess
import sys
import types

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Tensor, mint  # noqa: E402

from lora_parity.backends.mindone import compat  # noqa: E402
from lora_parity.parity.tolerances import (OP_ACCUMULATED, OP_DEFINITION, OP_EXACT, OP_FP16,  # noqa: E402
                                          OP_FP16_ROUNDED_ONCE, OP_GRID, OP_GRID_RELATIVE, OP_ROUNDED_ONCE)
from lora_parity.backends.port import configure_cpu  # noqa: E402

F = mint.nn.functional
RNG = np.random.default_rng(1234)
ALL_TARGETS = sorted(t for e in compat.CPU_COMPAT for t in e.targets)
# Where MindONE reaches the ops this layer reroutes: mint's modules and cells, the Tensor methods MindONE calls,
# and the Ascend primitive its attention dispatch builds.  A target anywhere else is a mistake in the table.
TARGET_PREFIXES = ("mindspore.mint.", "mindspore.Tensor.", "mindspore.ops.operations.nn_ops.")


@pytest.fixture(autouse=True)
def _sync_launch():
    # Synchronous PyNative launch: a kernel missing on this machine fails at its own call
    # (with the asynchronous default the error can surface at a later, unrelated op).
    configure_cpu()


@pytest.fixture
def cpu_compat():
    compat.remove_cpu_compat()
    compat.apply_cpu_compat("CPU")
    yield
    compat.remove_cpu_compat()


def _np(x):
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _original_or_none(target, *args, **kwargs):
    """mint's own op on these arguments, or None where this machine has no kernel for it."""
    ms.runtime.synchronize()  # what ran before (the op under test) reports its own errors here, outside the try
    try:
        out = compat.original(target)(*args, **kwargs)
        # a kernel launched asynchronously (as a worker's earlier tests may leave MindSpore) reports a missing
        # kernel at the next sync point, which an empty result never reaches: sync here, or the error surfaces in
        # the next op this test runs (seen once in make test: test_embedding_functional[index_shape5-int32])
        ms.runtime.synchronize()
        return _np(out)
    except (RuntimeError, TypeError, ValueError) as e:
        msg = str(e)
        if "unregistered" in msg or "only supports Ascend" in msg or "kernelmod" in msg.lower():
            return None
        raise


def _check(got, ref, target, args, kwargs=None, rtol=OP_DEFINITION.rtol, atol=OP_DEFINITION.atol, dtype=None):
    got_np = _np(got)
    assert got_np.shape == np.shape(ref)
    if dtype is not None:
        assert got.dtype == dtype
    np.testing.assert_allclose(got_np.astype(np.float64), np.asarray(ref, np.float64), rtol=rtol, atol=atol)
    orig = _original_or_none(target, *args, **(kwargs or {}))
    if orig is not None:  # mint's own kernel ran here: it must agree as well
        np.testing.assert_allclose(got_np.astype(np.float64), orig.astype(np.float64), rtol=rtol, atol=atol)


def _f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- the table and patching

def test_every_table_entry_names_an_existing_mindspore_attribute():
    kernels = [e.kernel for e in compat.CPU_COMPAT]
    assert len(kernels) == len(set(kernels))
    assert len(ALL_TARGETS) == len(set(ALL_TARGETS))
    for entry in compat.CPU_COMPAT:
        assert entry.why.strip() and entry.patches
        for target, replacement in entry.patches:
            prefix = next((p for p in TARGET_PREFIXES if target.startswith(p)), None)
            assert prefix is not None, f"{target}: outside the places MindONE's ops are bound"
            owner, name = compat._resolve(target)
            assert hasattr(owner, name), target
            assert callable(replacement)
            if name == "construct":
                assert isinstance(owner, type) and issubclass(owner, ms.nn.Cell), target
            if prefix == "mindspore.Tensor.":  # a Tensor method: rebound on the class itself
                assert owner is ms.Tensor and target.count(".") == 2, target
            if prefix == "mindspore.ops.operations.nn_ops.":  # a primitive class, replaced by a class
                assert isinstance(owner, types.ModuleType) and issubclass(compat.original(target), ms.ops.Primitive)
                assert isinstance(replacement, type), target


@pytest.mark.parametrize("device", ["Ascend", "GPU", "ascend"])
def test_other_devices_patch_nothing(device):
    compat.remove_cpu_compat()
    before = {t: compat.original(t) for t in ALL_TARGETS}
    assert compat.apply_cpu_compat(device) == []
    assert compat.patched() == {}
    for t in ALL_TARGETS:
        owner, name = compat._resolve(t)
        assert getattr(owner, name) is before[t]


def test_apply_is_idempotent_and_reversible():
    compat.remove_cpu_compat()
    originals = {t: getattr(*compat._resolve(t)) for t in ALL_TARGETS}
    try:
        first = compat.apply_cpu_compat("CPU")
        assert first == ALL_TARGETS  # no mindone modules in this venv: nothing to re-alias
        assert set(compat.patched()) == set(ALL_TARGETS)
        replaced = {t: getattr(*compat._resolve(t)) for t in ALL_TARGETS}
        assert compat.apply_cpu_compat("CPU") == first
        for entry in compat.CPU_COMPAT:
            for t, replacement in entry.patches:
                assert replaced[t] is replacement
                assert getattr(*compat._resolve(t)) is replacement  # not wrapped twice
                assert compat.original(t) is originals[t]
                assert compat.patched()[t] == entry.kernel
        assert mint.nn.functional.gelu is compat.gelu
        assert mint.nn.Conv2d.construct is compat._conv2d_construct
        assert mint.nn.Embedding.construct is compat._embedding_construct
        assert ms.ops.operations.nn_ops.FlashAttentionScore is compat.FlashAttentionScore
        # Tensor.repeat_interleave is inherited (TensorPy): the patch sits in Tensor's own dict, the base is untouched
        assert vars(Tensor)["repeat_interleave"] is compat._tensor_repeat_interleave
        assert vars(Tensor.__mro__[1])["repeat_interleave"] is originals["mindspore.Tensor.repeat_interleave"]
    finally:
        restored = compat.remove_cpu_compat()
    assert restored == ALL_TARGETS
    assert compat.patched() == {}
    for t in ALL_TARGETS:
        assert getattr(*compat._resolve(t)) is originals[t]
    assert "repeat_interleave" not in vars(Tensor)  # deleted again, not shadowed by a copy of the base's


def test_package_import_loads_no_framework():
    code = ("import sys, lora_parity.backends.mindone as m; "
            "bad = [f for f in ('mindspore', 'torch', 'mindone') if f in sys.modules]; "
            "assert not bad, bad; assert m.__doc__")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- GELU

def _np_gelu(x, approximate):
    x = x.astype(np.float64)
    if approximate == "none":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(cpu_compat, approximate):
    x = np.concatenate([np.linspace(-8, 8, 160), _f32(50, scale=3)]).astype(np.float32).reshape(3, -1)
    kw = {} if approximate == "none" else {"approximate": approximate}
    # float32 rounding of the exact value (MindSpore's own float32 CPU tanh is off by up to 1e-4)
    _check(F.gelu(Tensor(x), **kw), _np_gelu(x, approximate), "mindspore.mint.nn.functional.gelu",
           (Tensor(x),), kw, rtol=OP_ROUNDED_ONCE.rtol, atol=OP_ROUNDED_ONCE.atol, dtype=ms.float32)
    cell = mint.nn.GELU(approximate=approximate)  # the class calls F.gelu at call time
    np.testing.assert_allclose(_np(cell(Tensor(x))), _np_gelu(x, approximate), rtol=OP_ROUNDED_ONCE.rtol,
                               atol=OP_ROUNDED_ONCE.atol)
    half = F.gelu(Tensor(x, ms.float16), approximate=approximate)
    assert half.dtype == ms.float16
    np.testing.assert_allclose(_np(half).astype(np.float64), _np_gelu(x.astype(np.float16), approximate),
                               rtol=OP_FP16.rtol, atol=OP_FP16.atol)


def test_gelu_rejects_unknown_approximation(cpu_compat):
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(Tensor(_f32(3)), approximate="erf")


# --------------------------------------------------------------------------- layer norm

def _np_layer_norm(x, shape, w=None, b=None, eps=1e-5):
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    x = x.astype(np.float64)
    y = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


@pytest.mark.parametrize("shape,affine,eps", [((8,), False, 1e-5), ((8,), True, 1e-6), ((3, 8), True, 1e-5)])
def test_layer_norm_functional(cpu_compat, shape, affine, eps):
    x = _f32(2, 5, 3, 8, scale=3.0) + 1.5
    w, b = (_f32(*shape), _f32(*shape)) if affine else (None, None)
    args = (Tensor(x), shape, None if w is None else Tensor(w), None if b is None else Tensor(b), eps)
    _check(F.layer_norm(*args), _np_layer_norm(x, shape, w, b, eps), "mindspore.mint.nn.functional.layer_norm", args)
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(Tensor(x), (7,))


@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-6}])
def test_layer_norm_cell(cpu_compat, kwargs):
    x = _f32(2, 6, 16, scale=2.0) - 0.5
    cell = mint.nn.LayerNorm(16, **kwargs)
    w = b = None
    if cell.weight is not None:
        w = _f32(16)
        cell.weight.set_data(Tensor(w))
    if cell.bias is not None:
        b = _f32(16)
        cell.bias.set_data(Tensor(b))
    ref = _np_layer_norm(x, (16,), w, b, kwargs.get("eps", 1e-5))
    np.testing.assert_allclose(_np(cell(Tensor(x))), ref, rtol=OP_ACCUMULATED.rtol, atol=OP_ACCUMULATED.atol)


# --------------------------------------------------------------------------- conv2d

def _np_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation from the definition: out[n, o] = b[o] + sum_{c,i,j} w[o, c, i, j] * xpad[...]."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    kh, kw = w.shape[2:]
    if padding == "valid":
        pads = (0, 0, 0, 0)
    elif padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = pair(padding)
        pads = (ph, ph, pw, pw)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), pads[:2], pads[2:]))
    n, _, hh, ww = xp.shape
    o, cg = w.shape[:2]
    ho, wo = (hh - dh * (kh - 1) - 1) // sh + 1, (ww - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo))
    og = o // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out if b is None else out + b.reshape(1, -1, 1, 1)


CONV_CASES = [  # (stride, padding, dilation, groups, bias, kernel)
    (1, 0, 1, 1, True, (3, 3)),
    (1, 1, 1, 1, False, (3, 3)),
    (2, 1, 1, 1, True, (3, 3)),
    ((2, 1), (1, 2), (1, 2), 2, True, (3, 3)),
    (1, "same", 2, 1, True, (3, 2)),
    (1, "valid", 1, 4, False, (1, 1)),
    (3, 2, 2, 2, True, (2, 3)),
]


@pytest.mark.parametrize("stride,padding,dilation,groups,bias,kernel", CONV_CASES)
def test_conv2d_functional(cpu_compat, stride, padding, dilation, groups, bias, kernel):
    x = _f32(2, 4, 11, 9)
    w = _f32(8, 4 // groups, *kernel, scale=0.3)
    b = _f32(8) if bias else None
    args = (Tensor(x), Tensor(w), None if b is None else Tensor(b), stride, padding, dilation, groups)
    _check(F.conv2d(*args), _np_conv2d(x, w, b, stride, padding, dilation, groups),
           "mindspore.mint.nn.functional.conv2d", args, dtype=ms.float32)


def test_conv2d_unbatched_and_errors(cpu_compat):
    x, w = _f32(3, 7, 7), _f32(5, 3, 3, 3)
    out = F.conv2d(Tensor(x), Tensor(w), padding=1)
    np.testing.assert_allclose(_np(out), _np_conv2d(x[None], w, padding=1)[0], rtol=OP_ACCUMULATED.rtol, atol=OP_ACCUMULATED.atol)
    with pytest.raises(ValueError, match="same"):
        F.conv2d(Tensor(x), Tensor(w), stride=2, padding="same")
    with pytest.raises(ValueError, match="padding"):
        F.conv2d(Tensor(x), Tensor(w), padding="full")


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
    {"kernel_size": (3, 1), "padding": "same", "dilation": 2, "groups": 2},
    {"kernel_size": 1},
])
def test_conv2d_cell(cpu_compat, kwargs):
    x = _f32(1, 4, 8, 10)
    cell = mint.nn.Conv2d(4, 6, **kwargs)
    w = _np(cell.weight)
    b = None if cell.bias is None else _np(cell.bias)
    ref = _np_conv2d(x, w, b, kwargs.get("stride", 1), kwargs.get("padding", 0), kwargs.get("dilation", 1),
                     kwargs.get("groups", 1))
    np.testing.assert_allclose(_np(cell(Tensor(x))), ref, rtol=OP_ACCUMULATED.rtol, atol=OP_ACCUMULATED.atol)


def test_conv2d_cell_non_zero_padding_mode_keeps_mints_path(cpu_compat, monkeypatch):
    calls = []
    monkeypatch.setattr(compat, "original", lambda target: (lambda self, x: calls.append(target) or x))
    cell = mint.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    cell(Tensor(_f32(1, 2, 4, 4)))
    assert calls == ["mindspore.mint.nn.Conv2d.construct"]


# --------------------------------------------------------------------------- arange

@pytest.mark.parametrize("args,kwargs,ref", [
    ((5,), {}, np.arange(5, dtype=np.int64)),
    ((2, 11, 3), {}, np.arange(2, 11, 3, dtype=np.int64)),
    ((5, 0, -2), {}, np.arange(5, 0, -2, dtype=np.int64)),
    ((0, 1, 0.1), {}, (np.arange(10) * 0.1).astype(np.float32)),
    ((1.5, 4), {}, np.arange(1.5, 4, 1.0, dtype=np.float32)),
    ((), {"start": 0, "end": 16, "dtype": "float32"}, np.arange(16, dtype=np.float32)),
    ((0, 3), {"dtype": "float64"}, np.arange(3, dtype=np.float64)),
    ((0, 2.5, 0.5), {"dtype": "int32"}, (np.arange(5) * 0.5).astype(np.int32)),
    ((3, 3), {}, np.zeros(0, np.int64)),
])
def test_arange(cpu_compat, args, kwargs, ref):
    kwargs = {k: getattr(ms, v) if k == "dtype" else v for k, v in kwargs.items()}
    out = mint.arange(*args, **kwargs)
    assert str(_np(out).dtype) == str(ref.dtype)
    _check(out, ref, "mindspore.mint.arange", args, kwargs, rtol=OP_GRID.rtol, atol=OP_GRID.atol)


def test_arange_tensor_bounds_and_errors(cpu_compat):
    out = mint.arange(Tensor(1), Tensor(4))
    assert out.dtype == ms.int64 and _np(out).tolist() == [1, 2, 3]
    assert mint.arange(Tensor(2.0)).dtype == ms.float32
    with pytest.raises(ValueError, match="nonzero"):
        mint.arange(0, 3, 0)
    with pytest.raises(ValueError, match="sign"):
        mint.arange(0, 3, -1)
    with pytest.raises(ValueError, match="dtype"):
        mint.arange(5, dtype=ms.bool_)


# --------------------------------------------------------------------------- pad

@pytest.mark.parametrize("pads,value", [((1, 2), None), ((0, 1, 0, 1), 0), ((1, 1, 2, 0, 0, 3), 2.5),
                                        ((-1, 2), -1.0), ((-1, 2), None), ((2, -3, 1, -1), 4.0), ((0, -1), None),
                                        ((1, 0, 0, 0, 0, 0, 1, 1), 3.0)])
def test_pad_constant(cpu_compat, pads, value):
    x = _f32(2, 3, 4, 5)
    ref = x.astype(np.float64)
    for d in range(len(pads) // 2):  # (left, right) pairs from the last dimension backwards
        axis = x.ndim - 1 - d
        lo, hi = pads[2 * d], pads[2 * d + 1]
        ref = np.take(ref, range(max(-lo, 0), ref.shape[axis] - max(-hi, 0)), axis=axis)  # negative: crop
        lo, hi = max(lo, 0), max(hi, 0)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (lo, hi)
        ref = np.pad(ref, widths, constant_values=0.0 if value is None else value)
    kw = {} if value is None else {"value": value}
    _check(F.pad(Tensor(x), pads, **kw), ref, "mindspore.mint.nn.functional.pad", (Tensor(x), pads), kw,
           rtol=OP_EXACT.rtol, atol=OP_EXACT.atol, dtype=ms.float32)
    _check(F.pad(Tensor(x), list(pads), "constant", value), ref, "mindspore.mint.nn.functional.pad",
           (Tensor(x), list(pads), "constant", value), rtol=OP_EXACT.rtol, atol=OP_EXACT.atol)


def test_pad_int_tensor_and_errors(cpu_compat):
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = F.pad(Tensor(x), (1, 1), value=7)
    assert out.dtype == ms.int64
    assert (_np(out) == np.pad(x, ((0, 0), (1, 1)), constant_values=7)).all()
    assert F.pad(Tensor(x), ()) is not None
    with pytest.raises(ValueError, match="even"):
        F.pad(Tensor(x), (1, 1, 1))
    with pytest.raises(ValueError, match="negative"):
        F.pad(Tensor(x), (-2, -2))
    with pytest.raises(TypeError):
        F.pad(x, (1, 1))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_pad_other_modes_go_to_mint(cpu_compat, monkeypatch, mode):
    seen = []
    monkeypatch.setattr(compat, "original", lambda target: (lambda *a, **k: seen.append((target, a[1], k)) or a[0]))
    x = Tensor(_f32(1, 2, 4, 4))
    F.pad(x, (1, 1, 1, 1), mode=mode)
    assert seen == [("mindspore.mint.nn.functional.pad", (1, 1, 1, 1), {"mode": mode, "value": None})]


# --------------------------------------------------------------------------- stack, zeros_like, full, outer

@pytest.mark.parametrize("dim", [0, 1, 2, -1, -3])
def test_stack(cpu_compat, dim):
    xs = [_f32(3, 4) for _ in range(3)]
    ts = [Tensor(a) for a in xs]
    _check(mint.stack(ts, dim=dim), np.stack(xs, axis=dim), "mindspore.mint.stack", (ts,), {"dim": dim}, rtol=OP_EXACT.rtol, atol=OP_EXACT.atol)
    _check(mint.stack(tuple(ts), dim), np.stack(xs, axis=dim), "mindspore.mint.stack", (tuple(ts), dim), rtol=OP_EXACT.rtol, atol=OP_EXACT.atol)


@pytest.mark.parametrize("dtype", [None, "int32", "float16"])
def test_zeros_like(cpu_compat, dtype):
    x = Tensor(_f32(2, 3, 4))
    kw = {} if dtype is None else {"dtype": getattr(ms, dtype)}
    out = mint.zeros_like(x, **kw)
    assert out.dtype == (ms.float32 if dtype is None else getattr(ms, dtype))
    _check(out, np.zeros((2, 3, 4)), "mindspore.mint.zeros_like", (x,), kw, rtol=OP_EXACT.rtol, atol=OP_EXACT.atol)


@pytest.mark.parametrize("size,value,dtype,expect", [
    ((2, 3), 1.5, None, ms.float32),
    ([4], 7, None, ms.int64),
    ((2, 2), True, None, ms.bool_),
    ((3, 2), float("-inf"), "float16", ms.float16),
    ((2,), 2, "float32", ms.float32),
    ((0, 3), 1.0, None, ms.float32),
])
def test_full(cpu_compat, size, value, dtype, expect):
    kw = {} if dtype is None else {"dtype": getattr(ms, dtype)}
    out = mint.full(size, value, **kw)
    assert out.dtype == expect
    _check(out, np.full(tuple(size), value, dtype=np.float64), "mindspore.mint.full", (size, value), kw, rtol=OP_EXACT.rtol, atol=OP_EXACT.atol)


def test_full_tensor_value_and_errors(cpu_compat):
    for fill in (Tensor(3, ms.int32), Tensor([2.5], ms.float16)):
        out = mint.full((2, 2), fill)
        assert out.dtype == fill.dtype
        assert (_np(out) == _np(fill).reshape(())).all()
    with pytest.raises(TypeError):
        mint.full("ab", 1.0)
    with pytest.raises(ValueError):
        mint.full((2,), Tensor([1.0, 2.0]))


def test_outer(cpu_compat):
    a, b = _f32(5), _f32(3)
    _check(mint.outer(Tensor(a), Tensor(b)), np.outer(a.astype(np.float64), b), "mindspore.mint.outer",
           (Tensor(a), Tensor(b)), dtype=ms.float32)
    with pytest.raises(ValueError, match="1-D"):
        mint.outer(Tensor(_f32(2, 2)), Tensor(b))


# --------------------------------------------------------------------------- linspace

@pytest.mark.parametrize("start,end,steps,dtype", [(0, 1, 5, None), (-3.5, 7.25, 10, None), (10, -2, 7, None),
                                                   (0.00085 ** 0.5, 0.012 ** 0.5, 1000, None), (2, 9, 1, None),
                                                   (0, 999, 6, "float64"), (0, 10, 4, "int64")])
def test_linspace(cpu_compat, start, end, steps, dtype):
    kw = {} if dtype is None else {"dtype": getattr(ms, dtype)}
    out = mint.linspace(start, end, steps, **kw)
    ref = np.linspace(start, end, steps, dtype=np.float64)
    np_dtype = np.dtype(dtype or "float32")
    assert str(_np(out).dtype) == str(np_dtype)
    if steps:
        assert _np(out)[0] == np_dtype.type(start) and _np(out)[-1] == np_dtype.type(end if steps > 1 else start)
    # float64 values rounded to the output dtype: within one float32 ulp of numpy's
    _check(out, ref.astype(np_dtype), "mindspore.mint.linspace", (start, end, steps), kw, rtol=OP_GRID_RELATIVE.rtol, atol=OP_GRID_RELATIVE.atol)


def test_linspace_tensor_bounds_and_errors(cpu_compat):
    out = mint.linspace(Tensor(1.0), Tensor(2.0), 3)
    assert _np(out).tolist() == [1.0, 1.5, 2.0]
    for steps in (0, -1):  # mint's LinSpaceExt refuses these too
        with pytest.raises(ValueError, match="steps"):
            mint.linspace(1, 2, steps)


# --------------------------------------------------------------------------- baddbmm

@pytest.mark.parametrize("beta,alpha,in_shape", [(1, 1, (3, 4, 5)), (0.5, 2.0, (3, 4, 5)), (1, 0.125, (1, 4, 5)),
                                                 (2, 1, (5,))])
def test_baddbmm(cpu_compat, beta, alpha, in_shape):
    inp, b1, b2 = _f32(*in_shape), _f32(3, 4, 6), _f32(3, 6, 5)
    ref = beta * inp.astype(np.float64) + alpha * np.matmul(b1.astype(np.float64), b2)
    args = (Tensor(inp), Tensor(b1), Tensor(b2))
    _check(mint.baddbmm(*args, beta=beta, alpha=alpha), ref, "mindspore.mint.baddbmm", args,
           {"beta": beta, "alpha": alpha}, dtype=ms.float32)


def test_baddbmm_beta_zero_ignores_input(cpu_compat):
    b1, b2 = _f32(2, 3, 4), _f32(2, 4, 5)
    inp = np.full((2, 3, 5), np.nan, np.float32)
    out = mint.baddbmm(Tensor(inp), Tensor(b1), Tensor(b2), beta=0, alpha=0.5)
    np.testing.assert_allclose(_np(out), 0.5 * np.matmul(b1.astype(np.float64), b2), rtol=OP_DEFINITION.rtol,
                               atol=OP_DEFINITION.atol)


# --------------------------------------------------------------------------- repeat_interleave

@pytest.mark.parametrize("repeats,dim", [(2, None), (3, 0), (2, 1), (4, -1), (1, 2), (0, 1)])
def test_repeat_interleave(cpu_compat, repeats, dim):
    x = _f32(2, 3, 4)
    ref = np.repeat(x, repeats, axis=dim)
    kw = {} if dim is None else {"dim": dim}
    _check(mint.repeat_interleave(Tensor(x), repeats, **kw), ref, "mindspore.mint.repeat_interleave",
           (Tensor(x), repeats), kw, rtol=OP_EXACT.rtol, atol=OP_EXACT.atol, dtype=ms.float32)


def test_repeat_interleave_forms_and_errors(cpu_compat, monkeypatch):
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = mint.repeat_interleave(Tensor(x), Tensor([2]), dim=1, output_size=6)
    assert out.dtype == ms.int64 and (_np(out) == np.repeat(x, 2, axis=1)).all()
    assert (_np(mint.repeat_interleave(Tensor(5), 3)) == [5, 5, 5]).all()
    with pytest.raises(ValueError, match="output_size"):
        mint.repeat_interleave(Tensor(x), 2, dim=0, output_size=3)
    with pytest.raises(ValueError):
        mint.repeat_interleave(Tensor(x), -1)
    seen = []
    monkeypatch.setattr(compat, "original", lambda target: (lambda *a, **k: seen.append(target) or a[0]))
    mint.repeat_interleave(Tensor(x), Tensor([1, 2]), dim=0)  # per-row counts: mint's own kernel
    assert seen == ["mindspore.mint.repeat_interleave"]


# --------------------------------------------------------------------------- einsum

EINSUM_CASES = [  # the equations mindone 0.5.0 passes to mint.einsum, then general forms
    ("nhwpqc->nchpwq", [(2, 3, 4, 2, 2, 5)]),      # Transformer2DModel / PixArt / DiT / SD3 unpatchify
    ("nhwcpq->nchpwq", [(2, 3, 4, 5, 2, 2)]),      # CogView3Plus unpatchify
    ("...n,d->...nd", [(2, 3, 7), (4,)]),          # HiDream rope
    ("blh,bl->bh", [(2, 5, 3), (2, 5)]),           # transformers SQuAD head
    ("i...->i", [(3, 4, 5)]),                      # transformers watermarking
    ("m,d->md", [(6,), (4,)]),
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),                   # implicit output
    ("ij->", [(3, 4)]),
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 8), (2, 3, 5, 8)]),
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),  # broadcast ellipsis
]


@pytest.mark.parametrize("equation,shapes", EINSUM_CASES)
def test_einsum(cpu_compat, equation, shapes):
    arrays = [_f32(*s) for s in shapes]
    if equation == "i...->i":  # numpy wants the ellipsis in the output; mint/torch sum its dimensions
        ref = arrays[0].astype(np.float64).reshape(shapes[0][0], -1).sum(1)
    else:
        ref = np.einsum(equation, *[a.astype(np.float64) for a in arrays])
    tensors = [Tensor(a) for a in arrays]
    _check(mint.einsum(equation, *tensors), ref, "mindspore.mint.einsum", (equation, *tensors), rtol=OP_ACCUMULATED.rtol, atol=OP_ACCUMULATED.atol)


def test_einsum_forms_and_errors(cpu_compat):
    a, b = _f32(3, 4), _f32(4, 5)
    ref = a.astype(np.float64) @ b
    np.testing.assert_allclose(_np(mint.einsum("ij,jk->ik", [Tensor(a), Tensor(b)])), ref, rtol=OP_ACCUMULATED.rtol, atol=OP_ACCUMULATED.atol)
    np.testing.assert_allclose(_np(mint.einsum(Tensor(a), [0, 1], Tensor(b), [1, 2], [0, 2])), ref,
                               rtol=OP_ACCUMULATED.rtol, atol=OP_ACCUMULATED.atol)
    with pytest.raises(NotImplementedError, match="diagonal"):
        mint.einsum("ii->i", Tensor(_f32(3, 3)))
    with pytest.raises(ValueError):
        mint.einsum("ij,jk->ik", Tensor(a))
    with pytest.raises(ValueError):
        mint.einsum("ijk->i", Tensor(a))


# --------------------------------------------------------------------------- Tensor.repeat_interleave

@pytest.mark.parametrize("repeats,dim,output_size", [(2, None, None), (2, None, 48), (3, 0, None), (2, 1, 6),
                                                     (4, -1, 16), (1, 2, None), (0, 1, 0), ("tensor", 1, 9)])
def test_tensor_repeat_interleave(cpu_compat, repeats, dim, output_size):
    """The method MindONE's rotary embeddings call (``freqs.cos().repeat_interleave(2, dim=1)``)."""
    x = _f32(2, 3, 4)
    r = 3 if repeats == "tensor" else repeats
    ref = np.repeat(x, r, axis=dim)  # numpy's repeat is repeat_interleave's definition; flat when dim is None
    reps = Tensor([3]) if repeats == "tensor" else repeats
    kw = {} if output_size is None else {"output_size": output_size}
    args = (Tensor(x), reps) if dim is None else (Tensor(x), reps, dim)
    out = Tensor(x).repeat_interleave(*args[1:], **kw)
    _check(out, ref, "mindspore.Tensor.repeat_interleave", args, kw, rtol=OP_EXACT.rtol, atol=OP_EXACT.atol,
           dtype=ms.float32)


def test_tensor_repeat_interleave_per_element_counts_and_errors(cpu_compat, monkeypatch):
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = Tensor(x).repeat_interleave(Tensor([1, 2]), 0)  # per-row counts: the method's own kernel (runs on CPU)
    assert out.dtype == ms.int64 and (_np(out) == np.repeat(x, [1, 2], axis=0)).all()
    with pytest.raises(ValueError, match="output_size"):
        Tensor(x).repeat_interleave(2, 0, output_size=3)
    with pytest.raises(ValueError, match="non-negative"):
        Tensor(x).repeat_interleave(-1)
    with pytest.raises(TypeError):
        Tensor(x).repeat_interleave(True)
    seen = []
    monkeypatch.setattr(compat, "original", lambda target: (lambda *a, **k: seen.append((target, k)) or a[0]))
    Tensor(x).repeat_interleave([1, 2], 0, output_size=3)
    Tensor(x).repeat_interleave(Tensor([2, 1, 1]), dim=1)
    assert seen == [("mindspore.Tensor.repeat_interleave", {"output_size": 3}),
                    ("mindspore.Tensor.repeat_interleave", {})]  # only what the caller gave


# --------------------------------------------------------------------------- embedding

def _np_embedding(index, weight):
    """Row gather from the definition: out[i...] = weight[index[i...]]."""
    out = np.zeros(index.shape + weight.shape[1:], np.float64)
    for pos in np.ndindex(*index.shape):
        out[pos] = weight[index[pos]]
    return out


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("index_shape", [(), (5,), (2, 3), (2, 3, 4), (0,), (2, 0)])
def test_embedding_functional(cpu_compat, index_shape, index_dtype):
    w = _f32(7, 4)
    idx = RNG.integers(0, 7, size=index_shape).astype(index_dtype)
    if idx.size:
        idx.reshape(-1)[:2] = [0, 6][:idx.size]  # both ends of the table
    args = (Tensor(idx), Tensor(w))
    _check(F.embedding(*args), _np_embedding(idx, w), "mindspore.mint.nn.functional.embedding", args,
           rtol=OP_EXACT.rtol, atol=OP_EXACT.atol, dtype=ms.float32)
    # padding_idx and scale_grad_by_freq shape gradients only: the forward rows are the weight's own
    kw = {"padding_idx": 2, "scale_grad_by_freq": True}
    _check(F.embedding(*args, **kw), _np_embedding(idx, w), "mindspore.mint.nn.functional.embedding", args, kw,
           rtol=OP_EXACT.rtol, atol=OP_EXACT.atol)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding_cell(cpu_compat, dtype):
    """``mint.nn.Embedding`` (T5's token embedding and relative-position bias) through its patched construct."""
    cell = mint.nn.Embedding(9, 5, padding_idx=0, dtype=getattr(ms, dtype))
    w = _f32(9, 5).astype(dtype)
    cell.weight.set_data(Tensor(w))
    idx = RNG.integers(0, 9, size=(2, 6)).astype(np.int64)
    idx[0, 0] = 0
    out = cell(Tensor(idx))
    assert out.dtype == getattr(ms, dtype)
    np.testing.assert_allclose(_np(out).astype(np.float64), _np_embedding(idx, w.astype(np.float64)),
                               rtol=OP_EXACT.rtol, atol=OP_EXACT.atol)


def test_embedding_refusals(cpu_compat):
    w = Tensor(_f32(4, 3))
    for bad in ([0, 4], [-1, 2]):  # out of range (negative included): refused, never a silent wrap or zero row
        with pytest.raises(IndexError, match="out of range"):
            F.embedding(Tensor(np.array(bad, np.int64)), w)
    with pytest.raises(NotImplementedError, match="max_norm"):
        F.embedding(Tensor(np.array([0, 1], np.int64)), w, max_norm=1.0)
    with pytest.raises(NotImplementedError, match="max_norm"):
        mint.nn.Embedding(4, 3, max_norm=1.0)(Tensor(np.array([0], np.int32)))
    with pytest.raises(TypeError, match="int32 or int64"):
        F.embedding(Tensor(np.array([0.0, 1.0], np.float32)), w)
    with pytest.raises(ValueError, match="padding_idx"):
        F.embedding(Tensor(np.array([0], np.int64)), w, padding_idx=4)


# --------------------------------------------------------------------------- FlashAttentionScore

FAS = "mindspore.ops.operations.nn_ops.FlashAttentionScore"


def _np_attention(q, k, v, scale, discard):
    """softmax(q k^T * scale) v over the keys, in float64; ``discard`` True removes a key (MindSpore's mask)."""
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if discard is not None:
        scores = np.where(discard, -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.matmul(weights / weights.sum(-1, keepdims=True), v)


def _discard_mask(shape, s2):
    """A random boolean mask (True = discard) that keeps at least one key in every row."""
    discard = RNG.random(shape) < 0.5
    rows = np.arange(shape[-2])
    discard[..., rows, rows % s2] = False
    return discard


def _check_attention(impl, dtype, layout, mask, scale, s1=6, s2=6):
    """Call ``impl`` as MindONE's ``flash_attention_op`` calls the kernel and compare output 3 with
    :func:`_np_attention`.  fp32: float32 accumulation against float64 (OP_ACCUMULATED).  fp16: the
    float64 attention of the fp16-rounded inputs, rounded to fp16 -- the kernel's contract (inputs and
    output fp16, float32 inside) leaves at most one fp16 ulp between them (OP_FP16_ROUNDED_ONCE)."""
    b, n, d = 2, (3 if layout == "BNSD" else 1), 8
    np_dtype = np.dtype(dtype)
    q, k, v = (_f32(b, n, s, d, scale=2.0).astype(np_dtype) for s in (s1, s2, s2))
    discard = None
    if mask == "4d":
        discard = _discard_mask((b, 1, s1, s2), s2)
    elif mask == "2d":
        discard = _discard_mask((s1, s2), s2)
    ref = _np_attention(*(t.astype(np.float64) for t in (q, k, v)), scale, discard)
    inputs = (q, k, v) if layout == "BNSD" else (q[:, 0], k[:, 0], v[:, 0])  # BSH with one head: H = D
    if layout == "BSH":
        ref = ref[:, 0]
    op = impl(head_num=n, scale_value=scale, input_layout=layout)
    outs = op(*(Tensor(t) for t in inputs), None, None, None, None if discard is None else Tensor(discard))
    assert len(outs) == 4
    got = outs[3]
    assert got.dtype == getattr(ms, dtype) and tuple(got.shape) == ref.shape
    tol = OP_FP16_ROUNDED_ONCE if dtype == "float16" else OP_ACCUMULATED
    expected = ref.astype(np_dtype).astype(np.float64)
    np.testing.assert_allclose(_np(got).astype(np.float64), expected, rtol=tol.rtol, atol=tol.atol)


def _patched_fas(**kwargs):
    return ms.ops.operations.nn_ops.FlashAttentionScore(**kwargs)  # resolved at call time, as MindONE does


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("layout,mask,s1,s2", [("BNSD", None, 6, 6), ("BNSD", "4d", 6, 6), ("BNSD", "4d", 5, 7),
                                               ("BNSD", "2d", 4, 6), ("BSH", None, 6, 6), ("BSH", "4d", 5, 3),
                                               ("BSH", "2d", 6, 6)])
@pytest.mark.parametrize("scale", [8 ** -0.5, 0.125])
def test_flash_attention_score(cpu_compat, dtype, layout, mask, s1, s2, scale):
    assert ms.ops.operations.nn_ops.FlashAttentionScore is compat.FlashAttentionScore
    _check_attention(_patched_fas, dtype, layout, mask, scale, s1, s2)


def test_flash_attention_score_refusals(cpu_compat):
    q = Tensor(_f32(1, 2, 4, 8).astype(np.float16))
    with pytest.raises(NotImplementedError, match="layout"):
        _patched_fas(head_num=2, input_layout="SBH")
    with pytest.raises(NotImplementedError, match="dropout"):
        _patched_fas(head_num=2, keep_prob=0.9, input_layout="BNSD")
    with pytest.raises(NotImplementedError, match="several heads"):
        _patched_fas(head_num=2, input_layout="BSH")(q[:, 0], q[:, 0], q[:, 0])
    op = _patched_fas(head_num=2, input_layout="BNSD")
    for name in ("real_shift", "drop_mask", "padding_mask", "prefix"):
        with pytest.raises(NotImplementedError, match="only query, key, value and attn_mask"):
            op(q, q, q, **{name: Tensor(np.zeros((1, 2, 4, 4), np.float16))})
    with pytest.raises(ValueError, match="2-D or 4-D"):
        op(q, q, q, attn_mask=Tensor(np.zeros((1, 4, 4), np.bool_)))


# Realistic stand-in faults the check above must catch (each a wrong implementation handed to the same helper).
class _MaskIgnored(compat.FlashAttentionScore):
    def __call__(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
                 prefix=None):
        return super().__call__(query, key, value)


class _MaskAsPyTorch(compat.FlashAttentionScore):  # True = keep: PyTorch's convention, MindSpore's inverted
    def __call__(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
                 prefix=None):
        return super().__call__(query, key, value, attn_mask=None if attn_mask is None else ~attn_mask)


class _ScaleIgnored(compat.FlashAttentionScore):  # the kernel's default scale_value (1.0) instead of the caller's
    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "scale_value": 1.0})


class _SoftmaxOverQueries(compat.FlashAttentionScore):  # the softmax axis transposed (over queries, not keys)
    def __call__(self, query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
                 prefix=None):
        q, k, v = (t.astype(ms.float32) for t in (query, key, value))
        scores = ms.ops.matmul(q, k.swapaxes(-2, -1)) * self.scale
        if attn_mask is not None:
            scores = ms.ops.masked_fill(scores, ms.ops.broadcast_to(attn_mask, scores.shape), float("-inf"))
        return (None, None, None, ms.ops.matmul(ms.ops.softmax(scores, -2), v).astype(query.dtype))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("fault,mask", [(_MaskIgnored, "4d"), (_MaskAsPyTorch, "4d"), (_ScaleIgnored, None),
                                        (_SoftmaxOverQueries, None)])
def test_flash_attention_check_catches_a_wrong_stand_in(dtype, fault, mask):
    """The check is not vacuous: each fault fails it, at the looser fp16 tolerance too (self-attention shapes,
    so a transposed softmax still has the right shape and is caught by value)."""
    _check_attention(compat.FlashAttentionScore, dtype, "BNSD", mask, 0.125)  # the real one passes this case
    with pytest.raises(AssertionError):
        _check_attention(fault, dtype, "BNSD", mask, 0.125)
