"""``lora-parity demo``: the main job end to end on built-in, generated models (no downloads).

It generates a full-size SDXL-base MindONE LoRA (rank 4, attention only, as
MindONE trains by default) plus a training checkpoint's extras, converts it to
PEFT and kohya, converts back and checks the round trip is bitwise; then it
runs both frameworks on the built-in tiny SDXL with a LoRA and prints the
per-layer parity table.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from lora_parity.convert import formats
from lora_parity.convert.converter import ConvertOptions, convert
from lora_parity.convert.layout import PRESETS
from lora_parity.fixtures.synthetic import make_lora, training_extras, write_ms_lora


def run_demo(workdir: Path | None = None) -> int:
    """Work files in ``workdir`` (default: a temporary folder); the report stays in ./reports/demo."""
    report_root = Path(workdir) if workdir is not None else Path("reports") / "demo"
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lora-parity-demo-")
        root = Path(tmp.name)
    else:
        tmp = None
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        code = _run(root, report_root)
        if tmp is None:
            print(f"   files are in {root}")
        return code
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(root: Path, report_root: Path) -> int:
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
          f"{'bitwise identical' if same else 'DIFFERENT'}\n")
    return (0 if same else 1) or _parity(root, report_root)


DEMO_STEPS = 4
DEMO_GUIDANCE = 5.0


def _parity(root: Path, report_root: Path) -> int:
    """Both frameworks on the built-in tiny SDXL with a trained-looking LoRA, layer by layer."""
    import os

    from lora_parity.sides.run import quiet_frameworks

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_frameworks()  # before diffusers is imported (run_demo may be called without the CLI)
    try:
        import mindspore  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError as exc:
        print(f"5. Parity skipped: {exc.name} is not installed (make setup installs it)")
        return 0

    from lora_parity.compare import CompareOptions, run_compare
    from lora_parity.fixtures.bundle import write_fixture

    print("5. Parity on the built-in tiny SDXL: MindSpore (SGM cells + MindONE LoRA) vs "
          "PyTorch (diffusers + load_lora_weights of the converted file):")
    fx = write_fixture(root / "tiny")
    report_dir = report_root / "report"
    report = run_compare(CompareOptions(pt_base=fx.pt_base, ms_base=fx.ms_base, ms_lora=fx.ms_lora,
                                        latents=fx.latents, steps=DEMO_STEPS, guidance=DEMO_GUIDANCE,
                                        report_dir=report_dir))
    print(report.table())
    print(f"   report: {report_dir / 'report.json'} (+ side_by_side.png, diff_heatmap.png, layer_errors.png)")
    return 0 if report.passed else 1
