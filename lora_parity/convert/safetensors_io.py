"""A small safetensors reader/writer on numpy, BF16 included.

The ``safetensors`` package's numpy API has no bfloat16, and the converter must
not need torch; the format is an 8-byte header length, a JSON header and raw
little-endian data, so it is written here with the checks we want (offsets,
sizes, dtypes) reported as one-line errors naming the file and key.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from lora_parity.atomic import atomic_output
from lora_parity.errors import CheckpointFormatError
from lora_parity.convert.tensor import Tensor, from_st_name, itemsize, st_name

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class StEntry:
    """One tensor of a safetensors header, checked: dtype, shape and its byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | Path) -> tuple[dict[str, StEntry], dict[str, str], int]:
    """(entries in file order, ``__metadata__``, offset of the data); every entry checked against the file size.

    The one safetensors header parser: whole-file reads and lazy per-tensor reads both use it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size < 8:
                raise CheckpointFormatError("not a safetensors file (shorter than its 8-byte header length)", path=path)
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointFormatError(f"not a safetensors file (header length {n} exceeds the file)", path=path)
            try:
                header = json.loads(fh.read(n))
            except ValueError as exc:
                raise CheckpointFormatError(f"corrupt safetensors header: {exc}", path=path) from None
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError("corrupt safetensors header (not a JSON object)", path=path)
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    entries = {key: _entry(path, key, info, data_len) for key, info in header.items()}
    return entries, {str(k): str(v) for k, v in meta.items()}, 8 + n


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Return (tensors in file order, ``__metadata__``); data are copies, the file is closed."""
    path = Path(path)
    entries, meta, base = read_header(path)
    try:
        with open(path, "rb") as fh:
            size = path.stat().st_size
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            try:
                out = {key: Tensor.from_bytes(e.dtype, e.shape, mm[base + e.begin: base + e.end] if e.end > e.begin
                                              else b"") for key, e in entries.items()}
            finally:
                if mm is not None:
                    mm.close()
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read: {exc.strerror or exc}", path=path) from None
    return out, meta


def _entry(path, key, info, data_len) -> StEntry:
    try:
        dtype = from_st_name(info["dtype"])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointFormatError("corrupt safetensors entry", path=path, key=key) from None
    if dtype is None:
        raise CheckpointFormatError(f"unsupported dtype {info.get('dtype')!r}", path=path, key=key)
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
    if not (0 <= begin <= end <= data_len) or end - begin != expected:
        raise CheckpointFormatError(
            f"data offsets {begin}..{end} do not hold shape {list(shape)} {dtype} "
            f"({expected} bytes) within {data_len} data bytes (truncated or corrupt)", path=path, key=key)
    return StEntry(dtype, shape, begin, end)


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Atomically write; returns bytes written.  Tensors are laid out in the given order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, t in tensors.items():
        header[key] = {"dtype": st_name(t.dtype), "shape": list(t.shape),
                       "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_output(path) as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors.values():
            fh.write(memoryview(np.ascontiguousarray(t.data)).cast("B"))
    return 8 + len(blob) + offset


def is_safetensors(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"
