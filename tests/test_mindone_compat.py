"""The CPU stand-ins for MindONE's ``mindspore.mint`` ops (lora_parity.backends.mindone.compat).

Runs with MindSpore alone (no mindone needed: the mint ops are MindSpore's own).  Each table
entry's replacement is called through the patched ``mindspore.mint`` attribute and checked
against a numpy reference written from the op's definition; where mint's own kernel runs on this
machine it is compared too.  The patching itself: only on CPU, idempotent, reversible, and every
table entry names an attribute MindSpore has.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Tensor, mint  # noqa: E402

from lora_parity.backends.mindone import compat  # noqa: E402
from lora_parity.parity.tolerances import (OP_ACCUMULATED, OP_DEFINITION, OP_EXACT, OP_FP16, OP_GRID,  # noqa: E402
                                          OP_GRID_RELATIVE, OP_ROUNDED_ONCE)
from lora_parity.backends.port import configure_cpu  # noqa: E402

F = mint.nn.functional
RNG = np.random.default_rng(1234)
ALL_TARGETS = sorted(t for e in compat.CPU_COMPAT for t in e.targets)


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
    try:
        return _np(compat.original(target)(*args, **kwargs))
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
            assert target.startswith("mindspore.mint.")
            owner, name = compat._resolve(target)
            assert hasattr(owner, name), target
            assert callable(replacement)
            if name == "construct":
                assert isinstance(owner, type) and issubclass(owner, ms.nn.Cell), target


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
    finally:
        restored = compat.remove_cpu_compat()
    assert restored == ALL_TARGETS
    assert compat.patched() == {}
    for t in ALL_TARGETS:
        assert getattr(*compat._resolve(t)) is originals[t]


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
