"""Full-size SDXL-base UNet forward: diffusers vs the MindSpore port (PyNative and graph mode).

32x32 latents, batch 1, fp32, CPU, weights of ``random:sdxl-base`` (generated once into the
cache).  Each runner is its own process (one 10 GB UNet at a time); each does one warm-up
forward (graph mode compiles there) and then ``--repeat`` timed ones.  Prints one JSON line
per runner and the MindSpore/diffusers ratios.  Part of ``make bench``.

    python scripts/bench_fullsize_unet.py [--repeat 3] [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

RUNNERS = ("diffusers", "mindspore-pynative", "mindspore-graph")
SPEC = "random:sdxl-base"


def _inputs():
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 4, 32, 32), dtype=np.float32), np.float32(500.0),
            rng.standard_normal((1, 77, 2048), dtype=np.float32), rng.standard_normal((1, 2816), dtype=np.float32))


def _run_diffusers(cache, repeat):
    import torch

    from lora_parity.bases import resolve_base
    from lora_parity.backends.diffusers.capture import _Loader
    from lora_parity.sides.request import SideRequest

    b = resolve_base(SPEC, cache=cache)
    unet = _Loader(SideRequest(side="pt", pipeline_dir=str(b.pipeline_dir), variant=b.variant), torch.float32).load("unet")
    x, t, ctx, y = (torch.from_numpy(a) if hasattr(a, "shape") and a.ndim else torch.tensor(float(a)) for a in _inputs())
    cond = {"text_embeds": y[:, :1280], "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]])}

    def forward():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample.numpy()

    return forward


def _run_mindspore(cache, repeat, graph):
    import numpy as np
    from mindspore import Tensor

    from lora_parity.backends.port.runtime import configure_cpu
    from lora_parity.backends.port.unet import UNetModel
    from lora_parity.bases import resolve_base
    from lora_parity.convert.layout import layout_from_pipeline_dir
    from lora_parity.backends.port.capture import _Loader
    from lora_parity.sides.request import SideRequest

    configure_cpu()
    b = resolve_base(SPEC, cache=cache)
    layout = layout_from_pipeline_dir(b.pipeline_dir)
    req = SideRequest(side="ms", pipeline_dir=str(b.pipeline_dir), variant=b.variant, base_spec=SPEC,
                      cache=str(cache) if cache else None, graph=graph)
    unet = _Loader(req, layout).fill(UNetModel(layout.unet))
    x, t, ctx, y = _inputs()
    args = (Tensor(x), Tensor(np.full((1,), t, np.float32)), Tensor(ctx), Tensor(y))

    def forward():
        unet(*args).asnumpy()

    return forward


def child(runner: str, cache, repeat: int) -> dict:
    from lora_parity.sides.memory import peak_rss_bytes

    t0 = time.perf_counter()
    forward = (_run_diffusers(cache, repeat) if runner == "diffusers"
               else _run_mindspore(cache, repeat, graph=runner.endswith("graph")))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    forward()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    return {"runner": runner, "load_s": round(load_s, 1), "first_s": round(first, 2),
            "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "peak_rss_gb": round(peak_rss_bytes() / 2**30, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache, args.repeat)))
        return 0
    from lora_parity.bases import resolve_base

    resolve_base(SPEC, cache=args.cache, progress=True)  # generate once, outside the timings
    rows = {}
    for runner in RUNNERS:
        cmd = [sys.executable, __file__, "--child", runner, "--repeat", str(args.repeat)]
        if args.cache:
            cmd += ["--cache", args.cache]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[runner] = json.loads(out)
        print(out, flush=True)
    ref = rows["diffusers"]["median_s"]
    for runner in RUNNERS[1:]:
        print(f"{runner} / diffusers: {rows[runner]['median_s'] / ref:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
