#!/usr/bin/env python
"""Measure the basis of the replay rows: local, chained and LoRA-effect errors of correct runs, per component.

For each base and MindSpore backend, ``compare`` runs with its captures kept, and every aligned point is
summarised from the captures themselves (not from the report's verdict): the chained error (the whole run),
the local error (the block replayed on PyTorch's outputs) and the LoRA's effect error relative to the effect's
own size, as ``max|a-b|/max|ref|`` and ``max|a-b|/median|ref|``; the sinusoid points apart.  What
``lora_parity/parity/tolerances.py`` records as each row's measured basis comes from this table.

    .venv/bin/python scripts/measure_replay.py                         # fixture + random:tiny, both backends
    .venv/bin/python scripts/measure_replay.py --base random:sdxl-base --backends port --size 256 --timesteps 500
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lora_parity.compare import CompareOptions, run_compare  # noqa: E402
from lora_parity.parity.align import alignment_for  # noqa: E402
from lora_parity.parity.tolerances import is_sinusoid_point  # noqa: E402
from lora_parity.parity.verdict import LOCAL, NOLORA, NOT_REPLAYED  # noqa: E402
from lora_parity.sides.request import SideResult  # noqa: E402


def _err(a, b) -> tuple[float, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b).max(initial=0.0)
    ref = np.abs(b)
    return d / max(ref.max(initial=0.0), 1e-30), d / max(float(np.median(ref)), 1e-30)


def summarise(caps: Path, configs: Path, naming: str) -> dict:
    pt, ms = SideResult.load(caps / "pt"), SideResult.load(caps / "ms")
    rows: dict = {}

    def put(key, val):
        cur = rows.setdefault(key, [0.0, 0.0])
        rows[key] = [max(cur[0], val[0]), max(cur[1], val[1])]

    for a in alignment_for(configs, ms.meta["inputs"]["timesteps"], naming):
        comp = "sinusoid" if is_sinusoid_point(a.diffusers) else a.component
        if a.sgm in ms.acts and a.diffusers in pt.acts:
            put((comp, "chained"), _err(ms.acts[a.sgm], pt.acts[a.diffusers]))
        if LOCAL + a.sgm in ms.acts and a.sgm not in NOT_REPLAYED:
            put((comp, "local"), _err(ms.acts[LOCAL + a.sgm], pt.acts[a.diffusers]))
        keys = (LOCAL + a.sgm, NOLORA + a.sgm, LOCAL + a.diffusers, NOLORA + a.diffusers)
        if all(k in (ms.acts if i < 2 else pt.acts) for i, k in enumerate(keys)):
            e_ms = np.asarray(ms.acts[keys[0]], np.float64) - ms.acts[keys[1]]
            e_pt = np.asarray(pt.acts[keys[2]], np.float64) - pt.acts[keys[3]]
            if np.abs(e_pt).max(initial=0.0) > 0:
                put((comp, "effect"), _err(e_ms, e_pt))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", default=["fixture", "random:tiny", "random:tiny-refiner"])
    ap.add_argument("--backends", nargs="+", default=["port", "mindone"])
    ap.add_argument("--timesteps", default="999,500,1")
    ap.add_argument("--size", type=int, help="image size for random: bases (default the base's)")
    ap.add_argument("--cache", type=Path)
    args = ap.parse_args(argv)
    timesteps = tuple(float(t) for t in args.timesteps.split(","))
    print(f"{'base':<22} {'backend':<8} {'component':<15} {'kind':<8} {'max rel':>9} {'|d|/median':>10}")
    with tempfile.TemporaryDirectory(prefix="lp_measure_") as tmp:
        tmp = Path(tmp)
        fx = None
        for base in args.base:
            for backend in args.backends:
                caps = tmp / f"{base.replace(':', '_')}_{backend}"
                if base == "fixture":
                    if fx is None:
                        from lora_parity.fixtures.bundle import write_fixture

                        fx = write_fixture(tmp / "fx")
                    o = CompareOptions(pt_base=fx.pt_base, ms_base=fx.ms_base, latents=fx.latents, ms_lora=fx.ms_lora,
                                       timesteps=timesteps, ms_backend=backend, keep_captures=caps)
                    configs = fx.pt_base
                else:
                    lora = tmp / f"{base.replace(':', '_')}_lora.ckpt"
                    if not lora.is_file():
                        from lora_parity.bases import resolve_base
                        from lora_parity.convert.layout import layout_from_pipeline_dir
                        from lora_parity.convert.formats import write
                        from lora_parity.fixtures.synthetic import make_lora

                        pdir = resolve_base(base, cache=args.cache).pipeline_dir
                        # tiny: every LoRA-able module, convolutions included (LoCon); real size: every Dense
                        which = "all" if "tiny" in base else "linear"
                        write(lora, make_lora(layout_from_pipeline_dir(pdir), rank=4, alpha=8.0, seed=3,
                                              b_std=0.1, modules=which), "ms")
                    o = CompareOptions(base=base, cache=args.cache, ms_lora=lora, alpha=8.0, timesteps=timesteps,
                                       height=args.size, width=args.size, ms_backend=backend, keep_captures=caps)
                    from lora_parity.bases import resolve_base

                    configs = resolve_base(base, cache=args.cache).pipeline_dir
                t0 = time.perf_counter()
                report = run_compare(o)
                naming = "diffusers" if backend == "mindone" else "sgm"
                for (comp, kind), (rel, med) in sorted(summarise(caps, configs, naming).items()):
                    print(f"{base:<22} {backend:<8} {comp:<15} {kind:<8} {rel:>9.2e} {med:>10.2e}")
                print(f"{base:<22} {backend:<8} passed={report.passed} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
