"""Peak memory and wall time of a real-size ``compare`` against the CPU targets.

For each preset: a full-size LoRA (all UNet attention modules + the text encoders' attention,
rank 4, alpha 8), then exactly the README's command

    lora-parity compare --base random:<preset> --ms-lora L.ckpt --alpha 8 --height 256 --width 256 --steps 2

timed from the outside; each side's peak RSS comes from its own child process (report.json).
Generating the random base (once, cached) is not part of the timing.

    python scripts/measure_fullsize.py [sdxl-base] [sdxl-refiner] [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the targets (fp32, CPU, 2 cores): peak RSS per side and wall time of the whole compare
TARGETS = {"sdxl-base": {"peak_rss_gb": 16.0, "wall_s": 600.0}, "sdxl-refiner": {"peak_rss_gb": 12.0, "wall_s": None}}
ALPHA = 8.0


def measure(preset: str, cache: str | None) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lora_parity.bases import resolve_base
    from lora_parity.convert.layout import PRESETS
    from tests.faults import write_fullsize_lora

    resolve_base(f"random:{preset}", cache=cache, progress=True)
    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        lora = Path(tmp) / "lora.ckpt"
        write_fullsize_lora(PRESETS[preset], lora, alpha=ALPHA)
        cmd = [sys.executable, "-m", "lora_parity", "compare", "--base", f"random:{preset}", "--ms-lora", str(lora),
               "--alpha", str(ALPHA), "--height", "256", "--width", "256", "--steps", "2", "--quiet",
               "--report", str(Path(tmp) / "report")]
        if cache:
            cmd += ["--cache", cache]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        report = json.loads((Path(tmp) / "report" / "report.json").read_text())
    meta = report["meta"]
    peaks = {side: round(b / 1e9, 2) for side, b in meta["peak_rss_bytes"].items()}
    target = TARGETS[preset]
    return {"preset": preset, "exit_code": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gb": peaks,
            "seconds": {s: {k: round(v, 1) for k, v in d.items()} for s, d in meta["seconds"].items()},
            "max_layer_rel_err": max(m["rel_err"] for m in report["layers"]),
            "image_mae": report["image"]["mae"], "target": target,
            "within_target": max(peaks.values()) <= target["peak_rss_gb"]
            and (target["wall_s"] is None or wall <= target["wall_s"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="*", default=list(TARGETS))
    ap.add_argument("--cache")
    args = ap.parse_args()
    ok = True
    for preset in args.presets:
        row = measure(preset, args.cache)
        print(json.dumps(row), flush=True)
        ok &= row["within_target"] and row["exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
