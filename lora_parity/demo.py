"""``lora-parity demo``: the main job end to end on built-in, generated models (no downloads).

Today it generates a full-size SDXL-base MindONE LoRA (rank 4, attention only,
as MindONE trains by default) plus a training checkpoint's extras, converts it
to PEFT and kohya, converts back, checks the round trip is bitwise and prints
the reports.  The two-framework parity comparison joins here as it lands.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from . import formats
from .convert import ConvertOptions, convert
from .layout import PRESETS
from .synthetic import make_lora, training_extras, write_ms_lora


def run_demo(workdir: Path | None = None) -> int:
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lora-parity-demo-")
        root = Path(tmp.name)
    else:
        tmp = None
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        code = _run(root)
        if tmp is None:
            print(f"   files are in {root}")
        return code
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(root: Path) -> int:
    print("1. Generating a MindONE-style SDXL-base LoRA (rank 4, 560 attention modules) "
          "with optimizer state and step counters ...")
    lora = make_lora(PRESETS["sdxl-base"], rank=4, seed=0)
    src = write_ms_lora(root / "mindone_lora.ckpt", lora, extras=training_extras(lora))
    print(f"   {src} ({src.stat().st_size:,} bytes)\n")

    print("2. MindSpore -> PyTorch (PEFT, what diffusers' load_lora_weights reads):")
    peft = convert(ConvertOptions(src=src, force=True))
    print(peft.summary(), "\n")
    print("3. MindSpore -> PyTorch (kohya, what ComfyUI and A1111 read):")
    kohya = convert(ConvertOptions(src=src, dst=root / "mindone_lora_kohya.safetensors", fmt="kohya", force=True))
    print(kohya.summary(), "\n")

    print("4. Back to MindSpore and compare:")
    back = convert(ConvertOptions(src=peft.dst, dst=root / "roundtrip.ckpt", force=True))
    print(back.summary())
    original, _, _ = formats.read_tensors(src)
    again, _, _ = formats.read_tensors(back.dst)
    lora_keys = [k for k in original if k not in peft.skipped]
    same = set(lora_keys) == set(again) and all(original[k].bitwise_equal(again[k]) for k in lora_keys)
    print(f"\n   round trip MS -> PT -> MS: {len(lora_keys)} tensors, "
          f"{'bitwise identical' if same else 'DIFFERENT'}")
    return 0 if same else 1
