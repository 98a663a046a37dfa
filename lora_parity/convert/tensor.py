"""A framework-free tensor: dtype tag + shape + numpy storage.

numpy has no bfloat16, and the converter must run with neither torch nor
mindspore installed, so BF16 is kept as its raw ``uint16`` bit pattern.  Every
reader and writer speaks :class:`Tensor`, which makes round trips bitwise by
construction: bytes are only reinterpreted, never recomputed, unless a dtype
change is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# canonical name -> (numpy storage dtype, MindSpore ckpt name, safetensors name, itemsize)
_DTYPES: dict[str, tuple[str, str, str]] = {
    "F64": ("<f8", "Float64", "F64"),
    "F32": ("<f4", "Float32", "F32"),
    "F16": ("<f2", "Float16", "F16"),
    "BF16": ("<u2", "BFloat16", "BF16"),
    "I64": ("<i8", "Int64", "I64"),
    "I32": ("<i4", "Int32", "I32"),
    "I16": ("<i2", "Int16", "I16"),
    "I8": ("i1", "Int8", "I8"),
    "U64": ("<u8", "UInt64", "U64"),
    "U32": ("<u4", "UInt32", "U32"),
    "U16": ("<u2", "UInt16", "U16"),
    "U8": ("u1", "UInt8", "U8"),
    "BOOL": ("?", "Bool", "BOOL"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# user-facing names for --dtype
DTYPE_ALIASES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "fp64": "F64"}


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype that holds the raw bytes of canonical dtype ``name``."""
    return np.dtype(_DTYPES[name][0])


def itemsize(name: str) -> int:
    return storage_dtype(name).itemsize


def ms_name(name: str) -> str:
    """MindSpore's ``str(dtype)`` spelling, as written into ``tensor_type``."""
    return _DTYPES[name][1]


def st_name(name: str) -> str:
    """safetensors header spelling."""
    return _DTYPES[name][2]


_FROM_MS = {v[1]: k for k, v in _DTYPES.items()}
_FROM_MS["Uint8"] = "U8"  # older MindSpore spellings
_FROM_MS["Uint16"] = "U16"
_FROM_MS["Uint32"] = "U32"
_FROM_MS["Uint64"] = "U64"
_FROM_ST = {v[2]: k for k, v in _DTYPES.items()}


def from_ms_name(ms: str) -> str | None:
    return _FROM_MS.get(ms)


def from_st_name(st: str) -> str | None:
    return _FROM_ST.get(st)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening: bf16 is the top half of an IEEE float32."""
    flat = np.ascontiguousarray(bits).reshape(-1).astype(np.uint32)  # 0-d shifts promote to int64
    return (flat << np.uint32(16)).view(np.float32).reshape(np.shape(bits))


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even narrowing, as torch and MindSpore do; NaN stays NaN."""
    shape = np.shape(x)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    u = x.view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded.reshape(shape)


@dataclass(frozen=True)
class Tensor:
    """Raw tensor: ``data`` holds the storage dtype of ``dtype`` with the final shape."""

    dtype: str
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.data.dtype != storage_dtype(self.dtype):
            raise ValueError(f"storage {self.data.dtype} does not hold {self.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: str | None = None) -> "Tensor":
        """Wrap a numeric numpy array; ``dtype='BF16'`` rounds float input to bfloat16."""
        array = np.asarray(array)
        if dtype is None:
            for name, (np_dt, _, _) in _DTYPES.items():
                if name != "BF16" and array.dtype == np.dtype(np_dt):
                    dtype = name
                    break
            else:
                raise ValueError(f"unsupported numpy dtype {array.dtype}")
        if dtype == "BF16" and array.dtype != np.uint16:
            return cls("BF16", f32_to_bf16_bits(array.astype(np.float32)).reshape(array.shape))
        return cls(dtype, np.ascontiguousarray(array, dtype=storage_dtype(dtype)))

    @classmethod
    def from_bytes(cls, dtype: str, shape: tuple[int, ...], raw: bytes | memoryview) -> "Tensor":
        arr = np.frombuffer(raw, dtype=storage_dtype(dtype))
        return cls(dtype, arr.reshape(shape))

    def to_bytes(self) -> bytes:
        return np.ascontiguousarray(self.data).tobytes()

    def to_float(self, np_dtype: str = "float64") -> np.ndarray:
        """Numeric view for arithmetic (exact for every float dtype into float64)."""
        if self.dtype == "BF16":
            return bf16_bits_to_f32(self.data).astype(np_dtype)
        return self.data.astype(np_dtype)

    def astype(self, dtype: str) -> "Tensor":
        """Cast between float dtypes; same dtype returns self untouched (bitwise)."""
        if dtype == self.dtype:
            return self
        if dtype == "BF16":
            return Tensor("BF16", f32_to_bf16_bits(self.to_float("float32")).reshape(self.shape))
        return Tensor(dtype, self.to_float("float64").astype(storage_dtype(dtype)))

    def is_finite(self) -> bool:
        if self.dtype not in FLOAT_DTYPES:
            return True
        return bool(np.isfinite(self.to_float("float32" if self.dtype != "F64" else "float64")).all())

    def bitwise_equal(self, other: "Tensor") -> bool:
        return (
            self.dtype == other.dtype
            and self.shape == other.shape
            and self.to_bytes() == other.to_bytes()
        )
