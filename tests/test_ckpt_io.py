"""Pure-Python MindSpore .ckpt reader/writer against mindspore's own save/load."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_parity.convert import ckpt_io
from lora_parity.atomic import atomic_output
from lora_parity.convert.ckpt_io import is_ckpt, iter_ckpt, read_ckpt, write_ckpt
from lora_parity.errors import CheckpointFormatError
from lora_parity.convert.tensor import Tensor, ms_name, storage_dtype
from lora_parity.convert.tensor import bf16_bits_to_f32 as _widen

pytestmark = pytest.mark.conversion

ALL_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"]


# ----------------------------------------------------------------------------- helpers


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _record(tag: str, dims, ttype: str, content: bytes, *, packed: bool = False) -> bytes:
    """One Checkpoint{value{tag, tensor}} message, encoded independently of ckpt_io."""
    if packed:
        dims_b = _ld(1, b"".join(_varint(d) for d in dims)) if dims else b""
    else:
        dims_b = b"".join(b"\x08" + _varint(d) for d in dims)
    tensor = dims_b + _ld(2, ttype.encode()) + _ld(3, content)
    return _ld(1, _ld(1, tag.encode()) + _ld(2, tensor))


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """tensor.bf16_bits_to_f32, also for 0-d input."""
    bits = np.asarray(bits)
    return _widen(bits.reshape(-1)).reshape(bits.shape)


def _sample(dtype: str, shape, seed: int = 0) -> Tensor:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "BOOL":
        data = rng.integers(0, 2, n).astype(bool)
    elif dtype == "BF16":
        return Tensor.from_numpy(rng.standard_normal(n).astype(np.float32).reshape(shape), "BF16")
    elif dtype.startswith("F"):
        data = (rng.standard_normal(n) * 100).astype(storage_dtype(dtype))
    else:
        info = np.iinfo(storage_dtype(dtype))
        data = rng.integers(info.min, info.max, n, dtype=storage_dtype(dtype), endpoint=True)
    return Tensor(dtype, np.ascontiguousarray(data.reshape(shape)))


def _ms():
    ms = pytest.importorskip("mindspore")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return ms


def _to_ms(ms, t: Tensor):
    if t.dtype == "BF16":
        return ms.Tensor(bf16_bits_to_f32(t.data), ms.bfloat16)
    return ms.Tensor(t.data)


def _assert_ms_param_equals(ms, param, t: Tensor):
    assert str(param.dtype) == ms_name(t.dtype)
    assert tuple(param.shape) == t.shape
    if t.dtype == "BF16":
        got = param.float().asnumpy()
        np.testing.assert_array_equal(got.view(np.uint32), bf16_bits_to_f32(t.data).view(np.uint32))
    else:
        got = param.asnumpy()
        assert got.dtype == t.data.dtype
        assert got.tobytes() == t.data.tobytes()


def _mixed() -> dict[str, Tensor]:
    tensors = {}
    for i, dt in enumerate(ALL_DTYPES):
        tensors[f"net.{dt.lower()}.w4"] = _sample(dt, (2, 3, 1, 4), seed=i)
        tensors[f"net.{dt.lower()}.v"] = _sample(dt, (5,), seed=100 + i)
        tensors[f"net.{dt.lower()}.s"] = _sample(dt, (), seed=200 + i)
    return tensors


def _expect_error(path, *fragments):
    with pytest.raises(CheckpointFormatError) as info:
        read_ckpt(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message.lower(), message
    return info.value


# ----------------------------------------------------------------------------- mindspore -> us


def test_mindspore_save_reads_bitwise(tmp_path):
    ms = _ms()
    tensors = _mixed()
    path = tmp_path / "ms.ckpt"
    ms.save_checkpoint(
        [{"name": k, "data": _to_ms(ms, t)} for k, t in tensors.items()],
        str(path),
        append_dict={"epoch_num": 3, "step_num": 1234, "note": "hello"},
    )
    with pytest.warns(UserWarning, match="note"):
        ours = read_ckpt(path)
    assert list(ours) == [*tensors, "epoch_num", "step_num"]
    assert ours["step_num"].dtype == "I64" and ours["step_num"].shape == ()
    assert int(ours["step_num"].data) == 1234 and int(ours["epoch_num"].data) == 3
    loaded = ms.load_checkpoint(str(path))
    for name, tensor in tensors.items():
        assert ours[name].bitwise_equal(tensor), name
        _assert_ms_param_equals(ms, loaded[name], ours[name])
    assert is_ckpt(path)


def test_mindspore_save_dict_form(tmp_path):
    ms = _ms()
    t = _sample("F32", (3, 4))
    path = tmp_path / "d.ckpt"
    ms.save_checkpoint({"a.weight": ms.Parameter(ms.Tensor(t.data), name="a.weight"), "b": ms.Parameter(ms.Tensor(t.data * 2), name="b")}, str(path))
    ours = read_ckpt(path)
    assert list(ours) == ["a.weight", "b"]
    assert ours["a.weight"].bitwise_equal(t)
    np.testing.assert_array_equal(ours["b"].data, t.data * 2)


def test_writer_bytes_identical_to_mindspore(tmp_path):
    """Same tensors -> byte-identical file, with and without the CRC trailer."""
    ms = _ms()
    tensors = _mixed()
    for crc in (False, True):
        ms_path, our_path = tmp_path / f"ms{crc}.ckpt", tmp_path / f"ours{crc}.ckpt"
        ms.save_checkpoint([{"name": k, "data": _to_ms(ms, t)} for k, t in tensors.items()], str(ms_path), crc_check=crc)
        write_ckpt(our_path, tensors, crc=crc)
        assert our_path.read_bytes() == ms_path.read_bytes()


# ----------------------------------------------------------------------------- us -> mindspore


def test_written_file_loads_in_mindspore(tmp_path):
    ms = _ms()
    tensors = _mixed()
    tensors["empty"] = Tensor("F32", np.zeros((0, 3), np.float32))
    path = tmp_path / "ours.ckpt"
    write_ckpt(path, tensors)
    loaded = ms.load_checkpoint(str(path))
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        if tensor.data.size:
            _assert_ms_param_equals(ms, loaded[name], tensor)
    back = read_ckpt(path)
    for name, tensor in tensors.items():
        assert back[name].bitwise_equal(tensor), name


def test_write_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "x.ckpt"
    write_ckpt(path, {"a": _sample("F32", (2,))})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_ckpt(path, {"a": _sample("F32", (2,)), "b": np.zeros(2)})
    assert path.read_bytes() == before
    with pytest.raises(RuntimeError):
        with atomic_output(path) as handle:
            handle.write(b"partial")
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.ckpt"]
    write_ckpt(path, {"b": _sample("I8", (3,))})
    assert list(read_ckpt(path)) == ["b"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- CRC


def test_crc_files(tmp_path):
    ms = _ms()
    t = _sample("F16", (4, 4))
    path = tmp_path / "crc.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(t.data)}], str(path), crc_check=True)
    raw = path.read_bytes()
    assert raw[-17:-10] == b"crc_num"
    assert read_ckpt(path)["w"].bitwise_equal(t)

    bad = bytearray(raw)
    bad[-1] ^= 0x01  # flip a bit of the stored checksum
    (tmp_path / "badcrc.ckpt").write_bytes(bytes(bad))
    _expect_error(tmp_path / "badcrc.ckpt", "crc")

    bad = bytearray(raw)
    bad[-20] ^= 0x10  # flip a bit of the tensor content
    (tmp_path / "badbody.ckpt").write_bytes(bytes(bad))
    _expect_error(tmp_path / "badbody.ckpt", "crc")

    ours = tmp_path / "ours_crc.ckpt"
    write_ckpt(ours, {"w": t, "v": _sample("BF16", (3,))}, crc=True)
    loaded = ms.load_checkpoint(str(ours), crc_check=True)
    _assert_ms_param_equals(ms, loaded["w"], t)
    it = iter_ckpt(ours)  # stopping early must not hang on the background CRC thread
    assert next(it)[0] == "w"
    it.close()


# ----------------------------------------------------------------------------- split records


def _count_records(path) -> list[tuple[str, list[int], int]]:
    pb = pytest.importorskip("mindspore.train.checkpoint_pb2")
    msg = pb.Checkpoint()
    raw = open(path, "rb").read()
    if raw[-17:-10] == b"crc_num":
        raw = raw[:-17]
    msg.ParseFromString(raw)
    return [(v.tag, list(v.tensor.dims), len(v.tensor.tensor_content)) for v in msg.value]


def test_split_records_roundtrip(tmp_path, monkeypatch):
    ms = _ms()
    monkeypatch.setattr(ckpt_io, "SPLIT_BYTES", 1001)  # not a multiple of the itemsize on purpose
    tensors = {
        "big": _sample("F32", (3, 350)),  # 4200 bytes -> 5 records
        "small": _sample("I16", (10,)),
        "bf": _sample("BF16", (2, 700)),  # 2800 bytes -> 3 records
    }
    path = tmp_path / "split.ckpt"
    write_ckpt(path, tensors, crc=True)
    records = _count_records(path)
    assert [r[0] for r in records] == ["big"] * 5 + ["small"] + ["bf"] * 3
    assert all(r[1] == [3, 350] for r in records[:5])
    assert [r[2] for r in records[:5]] == [1001, 1001, 1001, 1001, 196]
    back = read_ckpt(path)
    for name, tensor in tensors.items():
        assert back[name].bitwise_equal(tensor)
    loaded = ms.load_checkpoint(str(path), crc_check=True)
    for name, tensor in tensors.items():
        _assert_ms_param_equals(ms, loaded[name], tensor)


def test_mindspore_split_records_read(tmp_path, monkeypatch):
    ms = _ms()
    serialization = pytest.importorskip("mindspore.train.serialization")
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KB -> 1024-byte chunks
    t = _sample("F64", (5, 130))  # 5200 bytes -> 6 records
    path = tmp_path / "mssplit.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(t.data)}, {"name": "z", "data": ms.Tensor(t.data[0, :100])}], str(path))
    records = _count_records(path)
    assert [r[0] for r in records] == ["w"] * 6 + ["z"]
    assert all(r[1] == [5, 130] for r in records[:6])
    back = read_ckpt(path)
    assert back["w"].bitwise_equal(t)
    # with the same threshold our writer produces the same bytes
    monkeypatch.setattr(ckpt_io, "SPLIT_BYTES", 1024)
    write_ckpt(tmp_path / "ours.ckpt", back)
    assert (tmp_path / "ours.ckpt").read_bytes() == path.read_bytes()


def test_bad_continuations(tmp_path):
    a = np.arange(4, dtype=np.float32)
    # consecutive same tag but different dims
    p = tmp_path / "dims.ckpt"
    p.write_bytes(_record("w", [4], "Float32", a[:2].tobytes()) + _record("w", [2, 2], "Float32", a[2:].tobytes()))
    _expect_error(p, "continuation")
    # consecutive same tag but different dtype
    p = tmp_path / "type.ckpt"
    p.write_bytes(_record("w", [4], "Float32", a[:2].tobytes()) + _record("w", [4], "Int32", a[2:].tobytes()))
    _expect_error(p, "continuation")
    # same tag again later
    p = tmp_path / "dup.ckpt"
    p.write_bytes(
        _record("w", [4], "Float32", a.tobytes())
        + _record("b", [1], "Float32", a[:1].tobytes())
        + _record("w", [4], "Float32", a.tobytes())
    )
    err = _expect_error(p, "twice")
    assert err.key == "w"
    # a valid continuation whose pieces do not add up
    p = tmp_path / "short.ckpt"
    p.write_bytes(_record("w", [4], "Float32", a[:2].tobytes()) + _record("w", [4], "Float32", a[2:3].tobytes()))
    _expect_error(p, "12 bytes", "16")


# ----------------------------------------------------------------------------- bad files


def test_empty_and_random(tmp_path):
    p = tmp_path / "empty.ckpt"
    p.write_bytes(b"")
    _expect_error(p, "empty")
    assert not is_ckpt(p)
    rng = np.random.default_rng(7)
    for i in range(20):
        p = tmp_path / f"random{i}.ckpt"
        p.write_bytes(rng.integers(0, 256, 1000 + i, dtype=np.uint8).tobytes())
        _expect_error(p)
    p = tmp_path / "missing.ckpt"
    _expect_error(p, "cannot open")
    assert not is_ckpt(p)


def test_truncated_everywhere(tmp_path):
    t = {"first": _sample("F32", (40,)), "second": _sample("BF16", (3, 5)), "third": _sample("I64", ())}
    good = tmp_path / "good.ckpt"
    write_ckpt(good, t)
    raw = good.read_bytes()
    assert raw[1] & 0x80  # the first record's length varint is multi-byte: offset 2 cuts mid-varint
    offsets = sorted({1, 2, 3, 5, 9, len(raw) // 2, len(raw) - 9, len(raw) - 1, *range(10, len(raw), 37)})
    for cut in offsets:
        p = tmp_path / f"cut{cut}.ckpt"
        p.write_bytes(raw[:cut])
        _expect_error(p)
    # cutting exactly between records is indistinguishable from a smaller checkpoint: it must read cleanly
    first_len = len(_record("first", [40], "Float32", t["first"].to_bytes()))
    p = tmp_path / "boundary.ckpt"
    p.write_bytes(raw[:first_len])
    assert list(read_ckpt(p)) == ["first"]


def test_content_shorter_or_longer_than_dims(tmp_path):
    a = np.arange(6, dtype=np.float32)
    p = tmp_path / "short.ckpt"
    p.write_bytes(_record("layer.w", [2, 4], "Float32", a.tobytes()))
    err = _expect_error(p, "24 bytes", "needs 32")
    assert err.key == "layer.w"
    p = tmp_path / "long.ckpt"
    p.write_bytes(_record("layer.w", [2, 2], "Float32", a.tobytes()))
    _expect_error(p, "needs 16")
    p = tmp_path / "neg.ckpt"
    p.write_bytes(_record("layer.w", [-1, 6], "Float32", a.tobytes()))
    _expect_error(p, "negative")


def test_unknown_dtype_and_map_tensor(tmp_path):
    p = tmp_path / "int4.ckpt"
    p.write_bytes(_record("ok", [1], "Float32", b"\0\0\0\0") + _record("q", [2], "Int4", b"\x12"))
    err = _expect_error(p, "unsupported tensor_type 'int4'")
    assert err.key == "q"
    p = tmp_path / "map.ckpt"
    inner = _ld(1, b"\x08\x02" + _ld(2, b"Int32") + _ld(3, b"\0" * 8))
    p.write_bytes(_ld(1, _ld(1, b"emb") + _ld(3, inner)))
    err = _expect_error(p, "map tensor")
    assert err.key == "emb"


def test_encrypted_refused(tmp_path):
    ms = _ms()
    path = tmp_path / "enc.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones((8, 8), np.float32))}], str(path), enc_key=b"0123456789abcdef")
    _expect_error(path, "encrypted", "decrypt")
    assert not is_ckpt(path)


# ----------------------------------------------------------------------------- encodings


def test_packed_and_unpacked_dims(tmp_path):
    t = _sample("F32", (2, 3, 300))  # 300 needs a two-byte varint
    for packed in (False, True):
        p = tmp_path / f"p{packed}.ckpt"
        p.write_bytes(_record("w", [2, 3, 300], "Float32", t.to_bytes(), packed=packed))
        assert read_ckpt(p)["w"].bitwise_equal(t)
        assert _count_records(p)[0][1] == [2, 3, 300]  # protobuf itself agrees with the hand encoding


def test_old_style_scalars_and_uint8_spelling(tmp_path):
    ms = _ms()
    p = tmp_path / "old.ckpt"
    p.write_bytes(
        _record("epoch_num", [0], "Int64", np.int64(5).tobytes())
        + _record("lr", [0], "Float32", np.float32(0.5).tobytes())
        + _record("mask", [3], "Uint8", b"\x01\x02\x03")
        + _record("none", [0], "Float32", b"")
        + _record("random_op", [0], "random_op", b"\x01\x02\x03")
    )
    with pytest.warns(UserWarning, match="random_op"):
        back = read_ckpt(p)
    assert "random_op" not in back
    assert back["epoch_num"].shape == () and int(back["epoch_num"].data) == 5
    assert back["lr"].shape == () and float(back["lr"].data) == 0.5
    assert back["mask"].dtype == "U8"
    assert back["none"].shape == (0,)
    loaded = ms.load_checkpoint(str(p), choice_func=lambda n: n in ("epoch_num", "lr"))
    assert int(loaded["epoch_num"].asnumpy()) == 5 and tuple(loaded["epoch_num"].shape) == ()


def test_bf16_stored_as_float32(tmp_path):
    ms = _ms()
    vals = np.array([1.00390625, 1.01171875, -3.3, np.inf, 65504.7, 3.4e38, 0.0, -0.0], np.float32)
    p = tmp_path / "bf32.ckpt"
    p.write_bytes(_record("w", [2, 4], "BFloat16", vals.tobytes()))
    ours = read_ckpt(p)["w"]
    assert ours.dtype == "BF16" and ours.shape == (2, 4)
    np.testing.assert_array_equal(ours.data.ravel(), (vals.view(np.uint32) >> 16).astype(np.uint16))
    loaded = ms.load_checkpoint(str(p))["w"]
    _assert_ms_param_equals(ms, loaded, ours)  # MindSpore narrows by truncation too
    nan = np.array([0x7F800001, 0xFFC00000], np.uint32).view(np.float32)
    p.write_bytes(_record("w", [2], "BFloat16", nan.tobytes()))
    assert np.isnan(bf16_bits_to_f32(read_ckpt(p)["w"].data)).all()


def test_is_ckpt_and_iter(tmp_path):
    p = tmp_path / "a.ckpt"
    write_ckpt(p, {"x": _sample("F16", (2, 2)), "y": _sample("U8", (3,))})
    assert is_ckpt(p)
    it = iter_ckpt(p)
    name, first = next(it)
    assert name == "x" and first.shape == (2, 2)
    it.close()
    (tmp_path / "st.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert not is_ckpt(tmp_path / "st.safetensors")
    # the returned arrays are writable copies, independent of the file
    data = read_ckpt(p)["x"].data
    before = data.copy()
    assert data.flags.writeable
    write_ckpt(p, {"x": Tensor("F16", np.zeros((2, 2), np.float16))})
    np.testing.assert_array_equal(data, before)


def test_progress_bar(tmp_path, monkeypatch, capsys):
    p = tmp_path / "a.ckpt"
    write_ckpt(p, {"x": _sample("F32", (64,))})
    monkeypatch.setattr(ckpt_io, "PROGRESS_MIN_BYTES", 0)
    read_ckpt(p, progress=True)
    assert "a.ckpt" in capsys.readouterr().err
    monkeypatch.setattr(ckpt_io, "PROGRESS_MIN_BYTES", 10**9)
    read_ckpt(p, progress=True)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- property


@st.composite
def _tensor_dicts(draw):
    n = draw(st.integers(1, 4))
    out = {}
    for i in range(n):
        dtype = draw(st.sampled_from(ALL_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
        count = int(np.prod(shape, dtype=np.int64))
        dt = storage_dtype(dtype)
        raw = draw(st.binary(min_size=count * dt.itemsize, max_size=count * dt.itemsize))
        data = np.frombuffer(raw, np.uint8) % 2 if dtype == "BOOL" else np.frombuffer(raw, np.uint8)
        arr = data.astype(np.uint8).view(dt).reshape(shape) if dtype == "BOOL" else data.view(dt).reshape(shape)
        name = draw(st.text(min_size=1, max_size=12))
        out[f"{i}.{name}"] = Tensor(dtype, arr.copy())
    return out


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(tensors=_tensor_dicts(), crc=st.booleans(), split=st.sampled_from([ckpt_io.SPLIT_BYTES, 7, 64]))
def test_property_roundtrip_bitwise(tmp_path, tensors, crc, split):
    path = tmp_path / "prop.ckpt"
    old = ckpt_io.SPLIT_BYTES
    ckpt_io.SPLIT_BYTES = split
    try:
        write_ckpt(path, tensors, crc=crc)
    finally:
        ckpt_io.SPLIT_BYTES = old
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = read_ckpt(path)
    assert list(back) == list(tensors)
    for name, tensor in tensors.items():
        got = back[name]
        if tensor.shape == (0,):
            assert got.shape == (0,)
        assert got.bitwise_equal(tensor), (name, tensor.dtype, tensor.shape)
