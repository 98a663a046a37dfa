"""Conversion speed on full-size SDXL-base LoRAs (rank 4 and rank 64, about 24 MB and 372 MB).

``make bench`` times these with pytest-benchmark; in ``make test`` (benchmarks
disabled) each body runs once and only its cheap correctness checks count.
Timings are never asserted here: ``scripts/bench_convert.py`` measures wall
time and peak memory against the old way (mindspore + torch.save) and ``cp``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_parity.convert import ckpt_io
from lora_parity.convert.converter import ConvertOptions, convert
from lora_parity.convert.layout import PRESETS
from lora_parity.convert.safetensors_io import read_safetensors
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

MODULES = 560  # MindONE's attention LoRA on SDXL base
TENSORS = 2 * MODULES  # lora_A + lora_B per module, in every format here
HEAVY = ("torch", "mindspore", "diffusers", "transformers")


def _rounds(src: Path) -> int:
    return 3 if src.stat().st_size > 100 * 2**20 else 10


def _make_ms(tmp_path_factory, rank: int):
    folder = tmp_path_factory.mktemp(f"bench_rank{rank}")
    lora = make_lora(PRESETS["sdxl-base"], rank=rank, seed=0)
    src = write_ms_lora(folder / f"sdxl_base_rank{rank}.ckpt", lora)
    expected = {"rank": rank}
    del lora
    return folder, src, expected


@pytest.fixture(scope="module")
def ms_rank4(tmp_path_factory):
    folder, src, expected = _make_ms(tmp_path_factory, 4)
    yield src, expected
    shutil.rmtree(folder, ignore_errors=True)  # large files: do not leave them in pytest's kept basetemps


@pytest.fixture(scope="module")
def ms_rank64(tmp_path_factory):
    folder, src, expected = _make_ms(tmp_path_factory, 64)
    yield src, expected
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def peft_rank64(ms_rank64, tmp_path_factory):
    src, _ = ms_rank64
    folder = tmp_path_factory.mktemp("bench_peft64")
    dst = folder / "sdxl_base_rank64_pt.safetensors"
    convert(ConvertOptions(src=src, dst=dst, fmt="peft"))
    yield dst
    shutil.rmtree(folder, ignore_errors=True)


def _bench_convert(benchmark, src: Path, dst: Path, fmt: str):
    """Time ``convert`` with a fresh output each round (its removal is not timed)."""
    def setup():
        dst.unlink(missing_ok=True)

    report = benchmark.pedantic(convert, args=(ConvertOptions(src=src, dst=dst, fmt=fmt),),
                                setup=setup, rounds=_rounds(src), warmup_rounds=0)
    benchmark.extra_info.update(file_bytes=src.stat().st_size, output_bytes=report.bytes_out)
    return report


def _check_peft(report, dst: Path, rank: int):
    assert report.src_format == "ms" and report.dst_format == "peft"
    assert report.modules == MODULES and report.tensors_written == TENSORS
    assert dict(report.ranks) == {rank: MODULES}
    tensors, meta = read_safetensors(dst)
    assert len(tensors) == TENSORS
    assert all(k.startswith("unet.") for k in tensors)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {rank}
    assert f'"unet.r": {rank}' in meta["lora_adapter_metadata"]


@pytest.mark.parametrize("rank", [4, 64])
def test_bench_ms_to_peft(benchmark, request, rank, tmp_path):
    src, _ = request.getfixturevalue(f"ms_rank{rank}")
    benchmark.group = f"convert-rank{rank}"
    dst = tmp_path / "out.safetensors"
    report = _bench_convert(benchmark, src, dst, "peft")
    _check_peft(report, dst, rank)
    dst.unlink()


@pytest.mark.benchmark(group="convert-rank64")
def test_bench_peft_to_ms_rank64(benchmark, peft_rank64, ms_rank64, tmp_path):
    src, _ = ms_rank64
    dst = tmp_path / "back.ckpt"
    report = _bench_convert(benchmark, peft_rank64, dst, "ms")
    assert report.src_format == "peft" and report.dst_format == "ms"
    assert report.modules == MODULES and report.tensors_written == TENSORS
    # same names, order and bytes as the MindONE original: compare sizes, then a cheap sample
    assert dst.stat().st_size == src.stat().st_size
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)
        a.seek(-(1 << 20), 2)
        b.seek(-(1 << 20), 2)
        assert a.read() == b.read()
    dst.unlink()


@pytest.mark.benchmark(group="read-rank64")
def test_bench_read_ckpt_rank64(benchmark, ms_rank64):
    src, expected = ms_rank64
    tensors = benchmark.pedantic(ckpt_io.read_ckpt, args=(src,), rounds=_rounds(src), warmup_rounds=0)
    benchmark.extra_info["file_bytes"] = src.stat().st_size
    assert len(tensors) == TENSORS
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {expected["rank"]}
    assert {t.dtype for t in tensors.values()} == {"F32"}
    assert all(t.data.flags.writeable for t in tensors.values())  # copies, independent of the closed file
    assert sum(t.nbytes for t in tensors.values()) > 0.99 * src.stat().st_size


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.benchmark(group="startup")
def test_bench_startup_convert_help(benchmark):
    proc = benchmark.pedantic(_run, args=([sys.executable, "-m", "lora_parity", "convert", "--help"],),
                              rounds=10, warmup_rounds=1)
    assert proc.returncode == 0, proc.stderr
    assert "usage: lora-parity convert" in proc.stdout


@pytest.mark.benchmark(group="startup")
def test_bench_startup_import_convert(benchmark):
    """Everything ``convert`` imports before reading a byte; none of it may be a framework."""
    code = ("import sys, lora_parity.cli, lora_parity.convert.converter; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = benchmark.pedantic(_run, args=([sys.executable, "-c", code],), rounds=10, warmup_rounds=1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"convert path imports {proc.stdout.strip()}"
