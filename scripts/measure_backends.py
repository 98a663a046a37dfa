"""Measure the three backends against each other, per component: port vs diffusers, mindone vs diffusers,
port vs mindone (the numbers the tolerance table's rows for ``port`` and ``mindone`` rest on).

Captures one bundle per backend (``lora-parity capture``, each in its own process and environment) on
the same inputs, then aligns every pair: the port's SGM blocks through the key map, mindone and
diffusers name to name.  Prints a table and writes ``measure_backends.json``.

    .venv/bin/python scripts/measure_backends.py [--base random:tiny] [--lora FILE.ckpt] [--out DIR]
        [--timesteps 999,500,1] [--port-numerics mindone]

Default: the built-in fixture (tiny SDXL) with its MindONE LoRA (rank 4, alpha 8).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_parity.sides.bundle import check_same_inputs, read_bundle  # noqa: E402
from lora_parity.compare import alignment_for  # noqa: E402
from lora_parity.parity.metrics import compare  # noqa: E402
from lora_parity.parity.tolerances import layer_tolerance  # noqa: E402

COMPONENTS = ("text_encoder", "text_encoder_2", "conditioning", "unet", "vae")


def capture(backend: str, out: Path, args, base_args: list[str]) -> Path:
    cmd = [sys.executable, "-m", "lora_parity", "capture", "--backend", backend, *base_args, "--quiet",
           "--timesteps", args.timesteps, "--steps", str(args.steps), "-o", str(out), "--force"]
    if args.lora:
        cmd += ["--lora", str(args.lora)]
    if backend == "port" and args.port_numerics:
        cmd += ["--port-numerics", args.port_numerics]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def per_component(ms, ref, naming: str, configs: Path, timesteps) -> dict:
    points = alignment_for(configs, timesteps, naming)
    report = compare(points, ms.result.acts, ref.result.acts, layer_tolerance("F32", backend="mindone"), "F32")
    out = {}
    for m in report.layers:
        c = out.setdefault(m.component, {"max_rel": 0.0, "worst": None})
        if m.rel_err >= c["max_rel"]:
            c.update(max_rel=float(m.rel_err), worst=m.diffusers)
    return out


def image_mae(a, b) -> float | None:
    import numpy as np

    from lora_parity.sampling import to_uint8

    x, y = a.result.images.get("image"), b.result.images.get("image")
    if x is None or y is None:
        return None
    return float(np.abs(to_uint8(x).astype(np.int16) - to_uint8(y).astype(np.int16)).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a --base SPEC (default: the built-in fixture)")
    p.add_argument("--lora", help="MindONE LoRA .ckpt (default: the fixture's)")
    p.add_argument("--timesteps", default="999,500,1")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--port-numerics", default=None)
    p.add_argument("--out", default=None, help="keep the bundles and the JSON here")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="measure-backends-")
    out = Path(args.out or tmp.name)
    out.mkdir(parents=True, exist_ok=True)
    if args.base:
        base_args = ["--base", args.base]
        port_args = base_args
    else:
        fx = out / "fx"
        if not (fx / "pt_base").is_dir():
            subprocess.run([sys.executable, "-m", "lora_parity", "fixture", str(fx)], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        base_args = ["--pt-base", str(fx / "pt_base"), "--latents", str(fx / "latents.npy")]
        port_args = base_args + ["--ms-base", str(fx / "ms_base.ckpt")]
        args.lora = args.lora or str(fx / "ms_lora.ckpt")
    bundles = {}
    for backend in ("diffusers", "port", "mindone"):
        bundles[backend] = read_bundle(capture(backend, out / backend, args,
                                               port_args if backend == "port" else base_args))
    for name in ("port", "mindone"):
        check_same_inputs(bundles[name], bundles["diffusers"])
    timesteps = [float(t) for t in args.timesteps.split(",")]
    configs = bundles["diffusers"].configs
    pairs = {
        "port vs diffusers": per_component(bundles["port"], bundles["diffusers"], "sgm", configs, timesteps),
        "mindone vs diffusers": per_component(bundles["mindone"], bundles["diffusers"], "diffusers", configs,
                                              timesteps),
        "port vs mindone": per_component(bundles["port"], bundles["mindone"], "sgm", configs, timesteps),
    }
    maes = {"port vs diffusers": image_mae(bundles["port"], bundles["diffusers"]),
            "mindone vs diffusers": image_mae(bundles["mindone"], bundles["diffusers"]),
            "port vs mindone": image_mae(bundles["port"], bundles["mindone"])}
    print(f"{'pair':22s}" + "".join(f"{c:>16s}" for c in COMPONENTS) + f"{'image MAE':>12s}")
    for pair, comps in pairs.items():
        row = "".join(f"{comps[c]['max_rel']:16.2e}" if c in comps else f"{'-':>16s}" for c in COMPONENTS)
        mae = maes[pair]
        print(f"{pair:22s}{row}{(f'{mae:12.4f}' if mae is not None else '-'):>12s}")
    seconds = {b: bundles[b].manifest["seconds"] for b in bundles}
    peak = {b: bundles[b].manifest["peak_rss_bytes"] for b in bundles}
    print("seconds (total):", {b: round(s.get("total", 0), 1) for b, s in seconds.items()})
    print("peak RSS (GB):", {b: round(v / 1e9, 2) for b, v in peak.items()})
    result = {"pairs": pairs, "image_mae": maes, "seconds": seconds, "peak_rss_bytes": peak,
              "timesteps": timesteps, "base": args.base or "fixture", "lora": args.lora,
              "port_numerics": bundles["port"].result.meta.get("mindspore_settings", {}).get("port_numerics"),
              "versions": {b: bundles[b].manifest["versions"] for b in bundles}}
    (out / "measure_backends.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
