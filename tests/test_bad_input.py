"""Bad-input corpus: each broken file or argument gets one clear line naming file (and key),
a non-zero exit, no traceback, no output written, and the input left untouched."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import ckpt_io, formats
from lora_parity.convert.safetensors_io import write_safetensors
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora
from lora_parity.convert.tensor import Tensor
from lora_parity.convert.layout import tiny_layout

from .helpers import run_cli, snapshot

pytestmark = pytest.mark.conversion

Q = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q"


def _good(tmp: Path, **kw) -> tuple[Path, dict]:
    lora = make_lora(tiny_layout(), rank=4, modules="all", **kw)
    tensors, _ = formats.tensors_for(lora, "ms")
    return write_ms_lora(tmp / "good.ckpt", lora), dict(tensors)


def _ckpt(tmp: Path, tensors: dict, name="bad.ckpt") -> Path:
    ckpt_io.write_ckpt(tmp / name, tensors)
    return tmp / name


def _raw_record(tag: str, dims: list[int], dtype: str, content: bytes) -> bytes:
    """Hand-made protobuf Checkpoint record (to build files our writer refuses to make)."""
    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def field(num, payload):
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    tensor = b"".join(varint(1 << 3) + varint(d) for d in dims) + field(2, dtype.encode()) + field(3, content)
    value = field(1, tag.encode()) + field(2, tensor)
    return field(1, value)


# Each case: (id, builder(tmp) -> (argv, expected substrings in the error line))
def case_missing_file(tmp):
    return ["convert", str(tmp / "nope.ckpt")], ["nope.ckpt", "no such file"]


def case_empty(tmp):
    (tmp / "empty.ckpt").write_bytes(b"")
    return ["convert", str(tmp / "empty.ckpt")], ["empty.ckpt", "empty"]


def case_random_bytes(tmp):
    (tmp / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    return ["convert", str(tmp / "random.ckpt")], ["random.ckpt"]


def case_truncated_ckpt(tmp):
    src, _ = _good(tmp)
    data = src.read_bytes()
    (tmp / "half.ckpt").write_bytes(data[: len(data) // 2])
    return ["convert", str(tmp / "half.ckpt"), "--layout", "tiny"], ["half.ckpt", "truncated"]


def case_truncated_safetensors(tmp):
    lora = make_lora(tiny_layout(), rank=4)
    write_safetensors(tmp / "t.safetensors", *formats.tensors_for(lora, "peft"))
    data = (tmp / "t.safetensors").read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[:-100])
    return ["convert", str(tmp / "cut.safetensors"), "--layout", "tiny"], ["cut.safetensors", "truncated"]


def case_content_shorter_than_dims(tmp):
    rec = _raw_record(Q + ".lora_A.weight", [4, 32], "Float32", b"\0" * (4 * 32 * 4 - 8))
    (tmp / "short.ckpt").write_bytes(rec)
    return ["convert", str(tmp / "short.ckpt"), "--layout", "tiny"], ["short.ckpt", Q + ".lora_A.weight"]


def case_unknown_dtype(tmp):
    rec = _raw_record(Q + ".lora_A.weight", [4, 32], "Float7", b"\0" * 128)
    (tmp / "dtype.ckpt").write_bytes(rec)
    return ["convert", str(tmp / "dtype.ckpt")], ["dtype.ckpt", "Float7"]


def case_encrypted(tmp):
    ms = pytest.importorskip("mindspore")
    ms.save_checkpoint([{"name": Q + ".lora_A.weight", "data": ms.Tensor(np.ones((4, 32), np.float32))}],
                       str(tmp / "enc.ckpt"), enc_key=b"0123456789abcdef")
    return ["convert", str(tmp / "enc.ckpt")], ["enc.ckpt", "encrypted"]


def case_encrypted_ninth_byte_brace(tmp):
    """Ciphertext is random: one encrypted file in 256 has '{' as its ninth byte, the
    safetensors sniff's mark (CI met one). Forced here so the sniff order is always tested."""
    argv, expected = case_encrypted(tmp)
    path = tmp / "enc.ckpt"
    raw = bytearray(path.read_bytes())
    raw[8:9] = b"{"
    path.write_bytes(bytes(raw))
    return argv, expected


def case_missing_lora_b(tmp):
    _, t = _good(tmp)
    del t[Q + ".lora_B.weight"]
    return ["convert", str(_ckpt(tmp, t)), "--layout", "tiny"], ["bad.ckpt", Q + ".lora_A.weight", "lora_B"]


def case_rank_mismatch(tmp):
    _, t = _good(tmp)
    t[Q + ".lora_B.weight"] = Tensor.from_numpy(np.ones((32, 3), np.float32))
    return ["convert", str(_ckpt(tmp, t)), "--layout", "tiny"], ["bad.ckpt", Q + ".lora_B.weight", "rank"]


def case_shape_mismatch_with_layout(tmp):
    _, t = _good(tmp)
    t[Q + ".lora_A.weight"] = Tensor.from_numpy(np.ones((4, 48), np.float32))
    return ["convert", str(_ckpt(tmp, t)), "--layout", "tiny"], ["bad.ckpt", Q + ".lora_A.weight", "expected"]


def case_nan(tmp):
    _, t = _good(tmp)
    a = t[Q + ".lora_B.weight"].data.copy()
    a[0, 0] = np.nan
    t[Q + ".lora_B.weight"] = Tensor.from_numpy(a)
    return ["convert", str(_ckpt(tmp, t)), "--layout", "tiny"], ["bad.ckpt", Q + ".lora_B.weight", "NaN"]


def case_inf_bf16(tmp):
    _, t = _good(tmp, dtype="BF16")
    a = t[Q + ".lora_A.weight"].to_float("float32")
    a[1, 1] = np.inf
    t[Q + ".lora_A.weight"] = Tensor.from_numpy(a, "BF16")
    return ["convert", str(_ckpt(tmp, t)), "--layout", "tiny"], ["bad.ckpt", Q + ".lora_A.weight", "Inf"]


def case_unknown_lora_key(tmp):
    _, t = _good(tmp)
    t["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn3.to_q.lora_A.weight"] = t[Q + ".lora_A.weight"]
    t["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn3.to_q.lora_B.weight"] = t[Q + ".lora_B.weight"]
    return ["convert", str(_ckpt(tmp, t)), "--layout", "tiny"], ["bad.ckpt", "attn3.to_q", "--no-strict"]


def case_output_exists(tmp):
    src, _ = _good(tmp)
    (tmp / "out.safetensors").write_bytes(b"precious")
    return ["convert", str(src), "-o", str(tmp / "out.safetensors")], ["out.safetensors", "--force"]


def case_bad_alpha(tmp):
    src, _ = _good(tmp)
    return ["convert", str(src), "--alpha", "-1"], ["--alpha"]


def case_bad_layout(tmp):
    src, _ = _good(tmp)
    return ["convert", str(src), "--layout", str(tmp / "missing.json")], ["missing.json", "preset"]


def case_layout_does_not_fit(tmp):
    src, _ = _good(tmp)
    return ["convert", str(src)], ["good.ckpt", "fits no preset", "--layout"]


def case_unfusable_qkv(tmp):
    name = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj"
    # q/k/v trained apart fuse into one block-diagonal LoRA only at one scale: k's alpha/rank differs
    lora = make_lora(tiny_layout(), rank=2, modules=[name])
    t, meta = formats.tensors_for(lora, "kohya")
    k = "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"
    t[f"{k}.lora_down.weight"] = Tensor.from_numpy(t[f"{k}.lora_down.weight"].data * 2)
    t[f"{k}.alpha"] = formats.kohya_alpha(float(t[f"{k}.alpha"].to_float()) * 2, t[f"{k}.alpha"].dtype)
    write_safetensors(tmp / "qkv.safetensors", t, meta)
    return (["convert", str(tmp / "qkv.safetensors"), "--layout", "tiny"],
            ["qkv.safetensors", f"{k}.lora_down.weight", "fused"])


def case_mixed_alphas_to_ms(tmp):
    lora = make_lora(tiny_layout(), rank=2)
    t, meta = formats.tensors_for(lora, "kohya")
    first_alpha = next(k for k in t if k.endswith(".alpha"))
    t[first_alpha] = Tensor.from_numpy(np.array(7.0, np.float32))
    write_safetensors(tmp / "k.safetensors", t, meta)
    return ["convert", str(tmp / "k.safetensors"), "--layout", "tiny"], ["k.safetensors", "alpha"]


def case_unsafe_pickle(tmp):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    return ["convert", str(tmp / "evil.pt")], ["evil.pt", "weights_only"]


def case_no_lora_tensors(tmp):
    t = {"model.diffusion_model.out.2.weight": Tensor.from_numpy(np.ones((4, 32, 3, 3), np.float32))}
    return ["convert", str(_ckpt(tmp, t, "base.ckpt"))], ["base.ckpt", "no LoRA tensors"]


def case_bad_dtype_name(tmp):
    src, _ = _good(tmp)
    return ["convert", str(src), "--dtype", "fp8"], ["--dtype"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_gets_one_clear_line(tmp_path, case):
    argv, expected = case(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli(argv)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    if "--dtype" not in argv:  # argparse's own usage message for invalid choices is two lines
        assert len(lines) == 1, err
    for s in expected:
        assert s in err, f"expected {s!r} in: {err}"
    assert snapshot(tmp_path) == before, "input modified or output written"


def test_corpus_is_large_enough():
    assert len(CASES) >= 12


def test_no_strict_skips_and_lists_unknown_keys(tmp_path):
    argv, _ = case_unknown_lora_key(tmp_path)
    code, out, err = run_cli(argv + ["--no-strict"])
    assert code == 0, err
    assert "NOT converted" in out and "attn3.to_q" in out


def test_force_overwrites(tmp_path):
    argv, _ = case_output_exists(tmp_path)
    code, out, err = run_cli(argv + ["--force", "--layout", "tiny"])
    assert code == 0, err
    assert (tmp_path / "out.safetensors").read_bytes() != b"precious"


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"\x0a\x05junk")
    proc = subprocess.run([sys.executable, "-m", "lora_parity", "convert", str(tmp_path / "x.ckpt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "x.ckpt" in proc.stderr
