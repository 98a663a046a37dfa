"""Read and write MindSpore ``.ckpt`` files without mindspore or protobuf.

The file is a protobuf ``Checkpoint`` message (``mindspore/train/checkpoint.proto``)::

    message Checkpoint {
      message Value {
        required string tag = 1;
        oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; }
      }
      repeated Value value = 1;
    }
    message TensorProto {
      repeated int64 dims = 1;            // proto2: written unpacked, may be packed
      required string tensor_type = 2;    // str(mindspore dtype): "Float32", "BFloat16", ...
      required bytes tensor_content = 3;  // raw little-endian, C order
    }

What MindSpore (2.x ``train/serialization.py``) does, and what this module mirrors:

* ``save_checkpoint`` serialises every parameter as its *own* one-value
  ``Checkpoint`` message and appends them, so the whole file parses as one
  message with a repeated ``value`` field.
* A tensor of more than 512 MiB is written as several consecutive values with
  the same tag, each carrying the *full* dims and the dtype, and a slice of the
  raw bytes (``_write_parameter_bytes_data``: 512 MiB chunks of ``get_bytes()``;
  the numpy path ``np.array_split``s along axis 0 -- either way the contents
  concatenate to the C-order bytes).  ``load_checkpoint`` joins the contents of
  consecutive equal tags and uses the dims of the last record.
* 0-d tensors are written with no dims; older releases wrote ``dims == [0]``,
  which ``load_checkpoint`` still maps to a scalar.  Both read as shape ``()``.
* ``crc_check=True`` appends ``b"crc_num"`` + the CRC-32 (``binascii.crc32``,
  the same as ``zlib.crc32``) of every byte before it, as a 10-byte big-endian integer.
* ``enc_key`` files are AES-GCM/AES-CBC/SM4-CBC blocks that start with the
  little-endian magic ``0x7F3A5ED8`` / ``..D9`` / ``..DA``; they cannot be read
  here and are refused with a message saying so.
* ``BFloat16`` content normally holds 2 bytes per element.  Content of 4 bytes
  per element (bf16 values widened to float32 by older pipelines) is accepted
  and narrowed the way ``load_checkpoint`` does it: by keeping the high 16 bits
  (NaN stays NaN).
* ``str`` (``append_dict`` strings) and ``random_op`` records are not tensors;
  they are skipped with a warning, or handed to the caller's ``skipped`` list
  (``save_checkpoint(..., append_dict=...)`` writes ints as Int64, floats as
  Float32 and bools as Bool 0-d tensors, strings as ``str`` records; checked with
  mindspore 2.10).  Map tensors (``MapParameter``) are refused.

Unlike ``load_checkpoint``, the reader insists that every tensor's content is
exactly ``prod(dims) * itemsize`` bytes and that the file is not truncated.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
import warnings
import zlib
from math import prod
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from lora_parity.atomic import atomic_output
from lora_parity.errors import CheckpointFormatError
from lora_parity.convert.tensor import Tensor, from_ms_name, itemsize, ms_name, storage_dtype

__all__ = ["read_ckpt", "iter_ckpt", "write_ckpt", "is_ckpt", "is_encrypted", "SPLIT_BYTES"]

#: Tensors with more raw bytes than this are split into several records of at
#: most this many bytes, exactly like MindSpore (``1024 * SLICE_SIZE`` KB).
#: Module level so tests can lower it.
SPLIT_BYTES = 512 * 1024 * 1024

#: ``progress=True`` shows a bar only for files larger than this.
PROGRESS_MIN_BYTES = 50 * 1024 * 1024

_CRC_MAGIC = b"crc_num"
_CRC_TRAILER = len(_CRC_MAGIC) + 10
# mindspore/core/utils/crypto: first 4 bytes of an encrypted file, little-endian
# 0x7F3A5ED8 (AES-GCM), 0x7F3A5ED9 (AES-CBC), 0x7F3A5EDA (SM4-CBC).
_CIPHER_MAGIC_TAIL = b"\x5e\x3a\x7f"
_NON_TENSOR_TYPES = frozenset({"str", "random_op"})
# after copying tensors out, give their mmap pages back in steps of this size
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_RELEASE_ALIGN = mmap.ALLOCATIONGRANULARITY
_RELEASE_STEP = 32 * 1024 * 1024

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


class _Malformed(Exception):
    """Internal: parse failure, turned into CheckpointFormatError with the path."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key


# --------------------------------------------------------------------------- wire format


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, new_pos)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Malformed(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed(f"varint longer than 10 bytes at byte {pos}")


def _skip(buf, wire_type: int, pos: int, end: int) -> int:
    """Skip an unknown field's payload (forward compatibility inside messages)."""
    if wire_type == _WT_VARINT:
        return _varint(buf, pos, end)[1]
    if wire_type == _WT_I64:
        new = pos + 8
    elif wire_type == _WT_I32:
        new = pos + 4
    elif wire_type == _WT_LEN:
        length, pos = _varint(buf, pos, end)
        new = pos + length
    else:
        raise _Malformed(f"invalid protobuf wire type {wire_type} at byte {pos}")
    if new > end:
        raise _Malformed(f"field runs past the end of its message at byte {pos}")
    return new


def _len_field(buf, pos: int, end: int, what: str) -> tuple[int, int]:
    """Read a length prefix; returns (start, stop) of the payload."""
    length, pos = _varint(buf, pos, end)
    if pos + length > end:
        raise _Malformed(f"{what} of {length} bytes at byte {pos} runs past the end (truncated file?)")
    return pos, pos + length


def _int64(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


class _Record:
    __slots__ = ("tag", "dims", "tensor_type", "start", "stop", "offset")

    def __init__(self, tag, dims, tensor_type, start, stop, offset):
        self.tag = tag
        self.dims = dims
        self.tensor_type = tensor_type
        self.start = start
        self.stop = stop
        self.offset = offset

    @property
    def size(self) -> int:
        return self.stop - self.start


def _parse_tensor(buf, pos: int, end: int, tag: str) -> tuple[list[int], str, int, int]:
    dims: list[int] = []
    tensor_type = None
    content = None
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == _WT_VARINT:  # unpacked dims (what MindSpore writes)
            value, pos = _varint(buf, pos, end)
            dims.append(_int64(value))
        elif field == 1 and wire == _WT_LEN:  # packed dims
            start, stop = _len_field(buf, pos, end, "packed dims")
            while start < stop:
                value, start = _varint(buf, start, stop)
                dims.append(_int64(value))
            pos = stop
        elif field == 2 and wire == _WT_LEN:
            start, pos = _len_field(buf, pos, end, "tensor_type")
            try:
                tensor_type = bytes(buf[start:pos]).decode("utf-8")
            except UnicodeDecodeError:
                raise _Malformed("tensor_type is not valid UTF-8", tag) from None
        elif field == 3 and wire == _WT_LEN:
            content = _len_field(buf, pos, end, "tensor_content")
            pos = content[1]
        elif field in (1, 2, 3):
            raise _Malformed(f"TensorProto field {field} has wrong wire type {wire}", tag)
        else:
            pos = _skip(buf, wire, pos, end)
    if tensor_type is None:
        raise _Malformed("tensor has no tensor_type (corrupt record)", tag)
    if content is None:
        raise _Malformed("tensor has no tensor_content (corrupt record)", tag)
    return dims, tensor_type, content[0], content[1]


def _parse_value(buf, pos: int, end: int, offset: int) -> _Record:
    tag = None
    tensor = None
    has_map = False
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == _WT_LEN:
            start, pos = _len_field(buf, pos, end, "tag")
            try:
                tag = bytes(buf[start:pos]).decode("utf-8")
            except UnicodeDecodeError:
                raise _Malformed(f"parameter name at byte {start} is not valid UTF-8") from None
        elif field == 2 and wire == _WT_LEN:
            if tensor is not None:
                raise _Malformed("record holds two tensors", tag)
            tensor = _len_field(buf, pos, end, "tensor")
            pos = tensor[1]
        elif field == 3 and wire == _WT_LEN:
            has_map = True
            pos = _len_field(buf, pos, end, "map tensor")[1]
        elif field in (1, 2, 3):
            raise _Malformed(f"Value field {field} has wrong wire type {wire} at byte {pos}", tag)
        else:
            pos = _skip(buf, wire, pos, end)
    if tag is None:
        raise _Malformed(f"record at byte {offset} has no parameter name")
    if has_map:
        raise _Malformed("unsupported map tensor (MindSpore MapParameter) in checkpoint", tag)
    if tensor is None:
        raise _Malformed("record has neither a tensor nor a map tensor", tag)
    dims, tensor_type, start, stop = _parse_tensor(buf, tensor[0], tensor[1], tag)
    return _Record(tag, dims, tensor_type, start, stop, offset)


def _records(buf, end: int, bar) -> Iterator[_Record]:
    pos = 0
    while pos < end:
        offset = pos
        key, pos = _varint(buf, pos, end)
        if key != (1 << 3 | _WT_LEN):
            raise _Malformed(
                f"unexpected protobuf field {key >> 3} (wire type {key & 7}) at byte {offset}; "
                "not a MindSpore checkpoint or corrupt"
            )
        start, pos = _len_field(buf, pos, end, "record")
        record = _parse_value(buf, start, pos, offset)
        if bar is not None:
            bar.update(pos - offset)
        yield record


# --------------------------------------------------------------------------- reading


def _looks_encrypted(head: bytes) -> bool:
    return len(head) >= 4 and head[1:4] == _CIPHER_MAGIC_TAIL and 0xD8 <= head[0] <= 0xDF


ENCRYPTED_MSG = (
    "file looks encrypted (saved with enc_key); decrypt it with mindspore first "
    "(mindspore.load_checkpoint(..., dec_key=...) then save_checkpoint without enc_key)"
)


def _narrow_bf16(raw: np.ndarray) -> np.ndarray:
    """float32 bit patterns -> bfloat16 bits by truncation, as load_checkpoint does."""
    u32 = raw.view("<u4")
    bits = (u32 >> 16).astype(np.uint16)
    nan = (u32 & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        bits[nan] |= 0x0040  # keep NaN a NaN when only low mantissa bits were set
    return bits


def _build(group: list[_Record], base: np.ndarray) -> Tensor:
    first = group[0]
    tag = first.tag
    dtype = from_ms_name(first.tensor_type)
    if dtype is None:
        raise _Malformed(f"unsupported tensor_type '{first.tensor_type}'", tag)
    dims = first.dims
    if any(d < 0 for d in dims):
        raise _Malformed(f"negative dimension in shape {dims}", tag)
    total = sum(r.size for r in group)
    size = itemsize(dtype)
    if dims == [0] and total in (0, size):
        shape: tuple[int, ...] = () if total == size else (0,)  # [0] = scalar (old MindSpore)
    else:
        shape = tuple(dims)
    count = prod(shape)
    expected = count * size
    if total == expected:
        bf16_as_f32 = False
    elif dtype == "BF16" and total == 2 * expected:
        bf16_as_f32 = True  # bf16 stored as float32 values
    else:
        raise _Malformed(
            f"tensor content is {total} bytes but shape {list(shape)} of {first.tensor_type} "
            f"needs {expected} (truncated or corrupt)",
            tag,
        )
    if len(group) == 1:
        raw = base[first.start : first.stop].copy()
    else:
        raw = np.empty(total, dtype=np.uint8)
        at = 0
        for record in group:
            raw[at : at + record.size] = base[record.start : record.stop]
            at += record.size
    if bf16_as_f32:
        data = _narrow_bf16(raw)
    else:
        data = raw.view(storage_dtype(dtype))
    return Tensor(dtype, data.reshape(shape))


class _CrcCheck(threading.Thread):
    """CRC-32 of ``[0, end)`` computed on a second file handle while the main thread parses.

    Reads with ``readinto`` into one small buffer, so it neither touches the
    mmap (no extra resident pages) nor holds the GIL (zlib releases it).
    """

    _CHUNK = 16 * 1024 * 1024

    def __init__(self, path: Path, end: int, stored: int):
        super().__init__(name="ckpt-crc", daemon=True)
        self.path, self.end, self.stored = path, end, stored
        self.computed: int | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            crc = 0
            left = self.end
            buffer = bytearray(min(self._CHUNK, max(left, 1)))
            view = memoryview(buffer)
            with open(self.path, "rb", buffering=0) as handle:
                while left and not self.stop.is_set():
                    got = handle.readinto(view[: min(len(buffer), left)])
                    if not got:
                        raise EOFError("file shrank while reading")
                    crc = zlib.crc32(view[:got], crc)
                    left -= got
            if not left:
                self.computed = crc
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self) -> None:
        """Wait for the checksum; raise :class:`_Malformed` on mismatch."""
        self.join()
        if self.error is not None:
            raise _Malformed(f"could not compute the CRC: {self.error}")
        if self.computed != self.stored:
            raise _Malformed(
                f"CRC check failed (stored {self.stored}, computed {self.computed}); the file is damaged"
            )


class _Source:
    """Open file + read-only mmap; a ``crc_num`` trailer is excluded and checked in the background."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.handle = open(path, "rb")
        except OSError as exc:
            raise CheckpointFormatError(f"cannot open checkpoint: {exc.strerror or exc}", path=path) from None
        self.mm = None
        self.crc: _CrcCheck | None = None
        try:
            size = os.fstat(self.handle.fileno()).st_size
            if size == 0:
                raise CheckpointFormatError("empty file, not a MindSpore checkpoint", path=path)
            self.mm = mmap.mmap(self.handle.fileno(), 0, access=mmap.ACCESS_READ)
            if _looks_encrypted(self.mm[:4]):
                raise CheckpointFormatError(ENCRYPTED_MSG, path=path)
            self.size = size
            self.end = size
            if size >= _CRC_TRAILER and self.mm[size - _CRC_TRAILER : size - 10] == _CRC_MAGIC:
                self.end = size - _CRC_TRAILER
                stored = int.from_bytes(self.mm[size - 10 : size], "big")
                self.crc = _CrcCheck(path, self.end, stored)
                self.crc.start()
        except BaseException:
            self.close()
            raise

    def release(self, start: int, stop: int) -> None:
        """Drop already-copied pages from this process's resident set (they stay in the page cache)."""
        if _MADV_DONTNEED is None or self.mm is None or stop <= start:
            return
        try:
            self.mm.madvise(_MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):  # pragma: no cover - platform quirks; only an optimisation
            pass

    def close(self) -> None:
        if self.crc is not None:
            self.crc.stop.set()
            self.crc.join()
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view still exists; the GC closes it
                pass
            self.mm = None
        self.handle.close()


def iter_ckpt(path: str | os.PathLike, *, progress: bool = False, skipped: list[str] | None = None,
              strings: dict[str, str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, Tensor)`` in file order; split records are joined.

    Names of non-tensor records (``append_dict`` strings, ``random_op``) are appended to
    ``skipped`` when a list is given, else reported with a warning.  ``strings`` (a dict) also
    receives the text of the ``str`` records (sd-scripts' ``ss_*`` metadata rides in them).

    Every failure is a :class:`CheckpointFormatError` naming ``path`` (and the
    parameter when known).  Tensor data are fresh writable arrays, independent
    of the file.  A ``crc_num`` trailer is verified on a background thread while
    parsing; a mismatch is raised before the last tensor is yielded (so
    :func:`read_ckpt` never returns data from a damaged file, but a consumer
    that stops iterating early gets no CRC verdict).
    """
    path = Path(os.fspath(path))
    source = _Source(path)
    bar = None
    try:
        if progress and source.size > PROGRESS_MIN_BYTES:
            from tqdm import tqdm

            bar = tqdm(total=source.size, unit="B", unit_scale=True, desc=path.name, file=sys.stderr, leave=False)
        yield from _iter_source(source, path, bar, skipped, strings)
        if bar is not None:
            bar.update(source.size - bar.n)
    finally:
        if bar is not None:
            bar.close()
        source.close()


def _iter_source(source: _Source, path: Path, bar, collect: list[str] | None,
                 strings: dict[str, str] | None = None) -> Iterator[tuple[str, Tensor]]:
    base = np.frombuffer(source.mm, dtype=np.uint8)
    seen: set[str] = set()
    skipped: list[str] = []
    group: list[_Record] = []
    released = 0  # pages before this offset were copied out and dropped from the resident set

    def consumed(upto: int) -> None:
        nonlocal released
        cut = upto - upto % _RELEASE_ALIGN
        if cut - released >= _RELEASE_STEP:
            source.release(released, cut)
            released = cut

    try:
        try:
            for record in _records(source.mm, source.end, bar):
                if group and record.tag == group[0].tag:
                    if record.tensor_type != group[0].tensor_type or record.dims != group[0].dims:
                        raise _Malformed(
                            "duplicated name whose record is not a valid continuation "
                            f"(dtype/shape {record.tensor_type}{record.dims} vs "
                            f"{group[0].tensor_type}{group[0].dims})",
                            record.tag,
                        )
                    group.append(record)
                    continue
                if group:
                    name = group[0].tag
                    tensor = _build(group, base)
                    group = []
                    consumed(record.offset)
                    yield name, tensor
                if record.tag in seen:
                    raise _Malformed("parameter name occurs twice in the checkpoint", record.tag)
                seen.add(record.tag)
                if record.tensor_type in _NON_TENSOR_TYPES:
                    skipped.append(record.tag)
                    if strings is not None and record.tensor_type == "str":
                        strings[record.tag] = _decode_str(source.mm[record.start:record.stop], record.tag)
                    continue
                group = [record]
            if group:
                name = group[0].tag
                tensor = _build(group, base)
                group = []
                if source.crc is not None:
                    source.crc.result()
                yield name, tensor
            elif source.crc is not None:
                source.crc.result()
        except _Malformed as exc:
            if not seen and not exc.message.startswith("CRC"):  # no good record: say what it may be
                raise CheckpointFormatError(
                    f"{exc.message} (not a MindSpore checkpoint; if it was saved with enc_key, "
                    "decrypt it with mindspore first)",
                    path=path,
                    key=exc.key,
                ) from None
            raise CheckpointFormatError(exc.message, path=path, key=exc.key) from None
        if not seen:
            raise CheckpointFormatError("checkpoint holds no parameters", path=path)
        if collect is not None:
            collect.extend(skipped)
        elif skipped:
            warnings.warn(
                f"{path}: skipped {len(skipped)} non-tensor entr{'y' if len(skipped) == 1 else 'ies'} "
                f"({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})",
                stacklevel=3,
            )
    finally:
        del base


def _decode_str(raw, tag: str) -> str:
    """A ``str`` record's content: numpy's ``<U`` bytes (UTF-32-LE, 4 bytes a character; mindspore 2.10)."""
    raw = bytes(raw)
    if len(raw) % 4:
        raise _Malformed(f"string record of {len(raw)} bytes is not UTF-32 text", tag)
    try:
        return raw.decode("utf-32-le").rstrip("\x00")
    except UnicodeDecodeError:
        raise _Malformed("string record is not valid UTF-32 text", tag) from None


def read_ckpt(path: str | os.PathLike, *, progress: bool = False, skipped: list[str] | None = None,
              strings: dict[str, str] | None = None) -> dict[str, Tensor]:
    """All tensors of a MindSpore checkpoint, in file order; scalars have shape ``()``.

    ``skipped``: a list that receives the names of non-tensor records instead of a warning.
    """
    return dict(iter_ckpt(path, progress=progress, skipped=skipped, strings=strings))


def is_ckpt(path: str | os.PathLike) -> bool:
    """Cheap sniff: field 1 / wire type 2 (a Value), whose first field is the tag string."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
    except OSError:
        return False
    if len(head) < 4 or head[0] != 0x0A:
        return False
    try:
        length, pos = _varint(head, 1, len(head))
    except _Malformed:
        return False
    return length > 0 and pos < len(head) and head[pos] == 0x0A


def is_encrypted(path: str | os.PathLike) -> bool:
    """True when the file starts with MindSpore's cipher magic (saved with ``enc_key``).

    Checked before any other sniff: the bytes after the magic are ciphertext, so
    one time in 256 the ninth byte is ``{`` and the file would pass for safetensors.
    """
    try:
        with open(path, "rb") as handle:
            return _looks_encrypted(handle.read(4))
    except OSError:
        return False


# --------------------------------------------------------------------------- writing


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_prefixed(field: int, payload_len: int) -> bytes:
    return _encode_varint(field << 3 | _WT_LEN) + _encode_varint(payload_len)


def _record_header(tag: bytes, dims: list[int], tensor_type: bytes, content_len: int) -> bytes:
    """Everything of one ``Checkpoint{value{tag, tensor{...}}}`` message before the content bytes."""
    tensor_head = b"".join(b"\x08" + _encode_varint(d) for d in dims)
    tensor_head += _len_prefixed(2, len(tensor_type)) + tensor_type + _len_prefixed(3, content_len)
    tensor_len = len(tensor_head) + content_len
    value_head = _len_prefixed(1, len(tag)) + tag + _len_prefixed(2, tensor_len)
    value_len = len(value_head) + tensor_len
    return _len_prefixed(1, value_len) + value_head + tensor_head


def write_ckpt(path: str | os.PathLike, tensors: Mapping[str, Tensor], *, crc: bool = False,
               strings: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a checkpoint ``mindspore.load_checkpoint`` reads back exactly.

    Like ``save_checkpoint``: one message per parameter, dims unpacked, 0-d
    tensors with no dims, tensors over :data:`SPLIT_BYTES` split into records of
    ``SPLIT_BYTES`` bytes; ``crc=True`` adds the ``crc_num`` trailer.  ``strings`` are written after the
    tensors as ``append_dict`` writes them (``str`` records, dims ``[0]``, UTF-32-LE text).  The
    file appears atomically (temp file + rename).
    """
    items = []
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {type(name).__name__}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name}: expected lora_parity.convert.tensor.Tensor, got {type(tensor).__name__}")
        items.append((name, tensor))
    split = int(SPLIT_BYTES)
    if split <= 0:
        raise ValueError("SPLIT_BYTES must be positive")
    with atomic_output(path) as handle:
        checksum = 0
        for name, tensor in items:
            tag = name.encode("utf-8")
            tensor_type = ms_name(tensor.dtype).encode("ascii")
            dims = [int(d) for d in tensor.shape]
            flat = np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8)
            total = flat.size
            chunks = [(0, total)] if total <= split else [(a, min(a + split, total)) for a in range(0, total, split)]
            with memoryview(flat) as view:
                for a, b in chunks:
                    header = _record_header(tag, dims, tensor_type, b - a)
                    piece = view[a:b]
                    handle.write(header)
                    handle.write(piece)
                    if crc:
                        checksum = zlib.crc32(piece, zlib.crc32(header, checksum))
        for name, text in (strings or {}).items():
            header = _record_header(name.encode("utf-8"), [0], b"str", 4 * len(text))
            piece = str(text).encode("utf-32-le")
            handle.write(header)
            handle.write(piece)
            if crc:
                checksum = zlib.crc32(piece, zlib.crc32(header, checksum))
        if crc:
            handle.write(_CRC_MAGIC + checksum.to_bytes(10, "big"))
