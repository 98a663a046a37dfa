#!/usr/bin/env python
"""Benchmark ``lora-parity convert`` against the old way, on full-size SDXL-base LoRAs.

For each rank (default 4 and 64: about 24 MB and 372 MB) this generates a
MindONE-style ``.ckpt`` in a temporary folder and measures, each in its own
subprocess, ``--repeat`` times (median reported, after ``--warmup`` unrecorded
rounds so every variant sees a warm page cache):

* new:  ``lora-parity convert SRC -o DST.safetensors -q`` (wall time, peak RSS)
* old:  ``mindspore.load_checkpoint(SRC)`` -> ``torch.from_numpy`` per parameter
        -> ``torch.save(dict, DST)``, what the old tool did minus the name mapping
        (wall time, peak RSS, and the child's own import/load/save split)
* cp:   ``cp SRC DST`` (wall time)

and once per run the start-up: ``lora-parity convert --help`` and
``python -c "import lora_parity.convert.converter"`` (everything ``convert`` imports
before it reads a byte).  If a start-up median exceeds 0.5 s (or with
``--importtime``) the top offenders of ``python -X importtime`` are listed.

Peak RSS is ``ru_maxrss`` of that one child, from ``os.wait4`` on its pid.
``getrusage(RUSAGE_CHILDREN)`` would not do: it is the maximum over *all*
reaped children so far.  Also note Linux counts the RSS a child inherited
before ``exec`` (fork/vfork) into its ``ru_maxrss``, so this parent imports
nothing heavy (no numpy, no lora_parity) and generates the files in a
subprocess; the ``python -c pass`` baseline row shows the floor.

Usage::

    .venv/bin/python scripts/bench_convert.py [--ranks 4 64] [--repeat 3] [--json out.json]

Timings are measurements, not assertions: the script always exits 0 unless a
measured command itself fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SPEEDUP = 5.0
TARGET_MEM_OVER_FILE = 300 * 2**20
TARGET_STARTUP_S = 0.5

GENERATE = r"""
import sys
from pathlib import Path
from lora_parity.convert.layout import PRESETS
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora
rank, path = int(sys.argv[1]), Path(sys.argv[2])
write_ms_lora(path, make_lora(PRESETS["sdxl-base"], rank=rank, seed=0))
"""

# The old tool: mindspore reads the checkpoint into Parameters, each becomes a
# torch tensor, torch pickles the dict.  Prints its own phase split as JSON.
OLD_WAY = r"""
import json, sys, time
t0 = time.perf_counter()
import mindspore
import torch
t1 = time.perf_counter()
params = mindspore.load_checkpoint(sys.argv[1])
t2 = time.perf_counter()
state = {name: torch.from_numpy(p.asnumpy()) for name, p in params.items()}
torch.save(state, sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "save_s": t3 - t2, "tensors": len(state)}))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the package is installed editable in the venv; this keeps a plain checkout working too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("GLOG_v", "3")  # quiet MindSpore's C++ logging
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def cli_argv() -> list[str]:
    """The installed ``lora-parity`` entry point next to this interpreter, else ``python -m``."""
    exe = Path(sys.executable).with_name("lora-parity")
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    found = shutil.which("lora-parity")
    return [found] if found else [sys.executable, "-m", "lora_parity"]


def measure(argv: list[str], *, check: bool = True) -> dict:
    """Run ``argv`` once; wall time and peak RSS of exactly that child (``os.wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if check and proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{stderr[-3000:]}")
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return {"wall_s": wall, "peak_rss_bytes": peak, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "rc": proc.returncode, "stdout": stdout, "stderr": stderr}


def _median_of(runs: list[dict]) -> dict:
    keys = ("wall_s", "peak_rss_bytes", "user_s", "sys_s")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    med["wall_s_all"] = [round(r["wall_s"], 4) for r in runs]
    med["peak_rss_bytes_all"] = [r["peak_rss_bytes"] for r in runs]
    return med


def bench_file(src: Path, workdir: Path, repeat: int, warmup: int) -> dict:
    cli = cli_argv()
    dst_new = workdir / f"{src.stem}_new.safetensors"
    dst_old = workdir / f"{src.stem}_old.pt"
    dst_cp = workdir / f"{src.stem}_cp.ckpt"
    variants = {
        "new": (cli + ["convert", str(src), "-o", str(dst_new), "-q"], dst_new),
        "old": ([sys.executable, "-c", OLD_WAY, str(src), str(dst_old)], dst_old),
        "cp": (["cp", str(src), str(dst_cp)], dst_cp),
    }
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(warmup + repeat):
        for name, (argv, dst) in variants.items():  # interleaved: drift hits all variants alike
            dst.unlink(missing_ok=True)
            r = measure(argv)
            if i >= warmup:
                runs[name].append(r)
            print(f"  {src.name} {name:<3} round {i + 1 - warmup if i >= warmup else 'warm-up'}: "
                  f"{r['wall_s']:.3f} s, peak {r['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    out_sizes = {name: dst.stat().st_size for name, (_, dst) in variants.items()}
    for _, dst in variants.values():
        dst.unlink(missing_ok=True)
    result = {name: _median_of(rs) for name, rs in runs.items()}
    phases = [json.loads(r["stdout"].strip().splitlines()[-1]) for r in runs["old"]]
    result["old"]["phases_median"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    size = src.stat().st_size
    new, old, cp = result["new"], result["old"], result["cp"]
    result.update({
        "file": src.name, "file_bytes": size, "output_bytes": out_sizes,
        "speedup_old_over_new": old["wall_s"] / new["wall_s"],
        "new_over_cp": new["wall_s"] / cp["wall_s"],
        "new_peak_minus_file_bytes": new["peak_rss_bytes"] - size,
        "old_peak_minus_file_bytes": old["peak_rss_bytes"] - size,
    })
    return result


def parse_importtime(stderr: str, top: int = 10) -> dict:
    """Top offenders from ``-X importtime``: by self time, and top-level imports by cumulative time."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:"):].split("|", 2)
        try:
            rows.append((int(parts[0]), int(parts[1]), parts[2].rstrip()[1:]))  # keep the nesting indent
        except (IndexError, ValueError):
            continue
    depth = lambda name: (len(name) - len(name.lstrip(" "))) // 2  # noqa: E731
    top_level = [r for r in rows if depth(r[2]) <= 2]
    return {
        "total_s": sum(r[0] for r in rows) / 1e6,
        "by_cumulative_top_level": [{"module": n.strip(), "cumulative_s": c / 1e6, "self_s": s / 1e6}
                                    for s, c, n in sorted(top_level, key=lambda r: -r[1])[:top]],
        "by_self": [{"module": n.strip(), "self_s": s / 1e6}
                    for s, c, n in sorted(rows, key=lambda r: -r[0])[:top]],
    }


def bench_startup(repeat: int, warmup: int, force_importtime: bool) -> dict:
    cli = cli_argv()
    cases = {
        "convert_help": cli + ["convert", "--help"],
        "import_convert": [sys.executable, "-c", "import lora_parity.convert.converter"],
        "python_baseline": [sys.executable, "-c", "pass"],
    }
    out = {}
    for name, argv in cases.items():
        rs = [measure(argv) for _ in range(warmup + repeat)][warmup:]
        out[name] = _median_of(rs)
    # which heavy frameworks does the convert path pull in?  (should be none)
    probe = measure([sys.executable, "-c",
                     "import sys, lora_parity.cli, lora_parity.convert.converter; "
                     "print(','.join(m for m in ('torch', 'mindspore', 'diffusers', 'transformers', 'safetensors', "
                     "'tqdm', 'scipy') if m in sys.modules))"])
    out["heavy_modules_imported_by_convert"] = [m for m in probe["stdout"].strip().split(",") if m]
    slow = force_importtime or any(out[k]["wall_s"] > TARGET_STARTUP_S for k in ("convert_help", "import_convert"))
    if slow:
        it = measure([sys.executable, "-X", "importtime", "-c", "import lora_parity.cli, lora_parity.convert.converter"])
        out["importtime"] = parse_importtime(it["stderr"])
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def render(results: dict) -> str:
    lines = [
        "| rank | file MiB | new s | new peak MiB | new peak - file MiB | old s | old peak MiB "
        "| old/new | cp s | new/cp | old import / load / save s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rank, r in results["files"].items():
        ph = r["old"]["phases_median"]
        lines.append(
            f"| {rank} | {_mib(r['file_bytes'])} | {r['new']['wall_s']:.2f} | {_mib(r['new']['peak_rss_bytes'])} "
            f"| {_mib(r['new_peak_minus_file_bytes'])} | {r['old']['wall_s']:.2f} "
            f"| {_mib(r['old']['peak_rss_bytes'])} | {r['speedup_old_over_new']:.1f}x "
            f"| {r['cp']['wall_s']:.3f} | {r['new_over_cp']:.1f}x "
            f"| {ph['import_s']:.2f} / {ph['load_s']:.2f} / {ph['save_s']:.2f} |")
    s = results["startup"]
    lines += [
        "",
        "| start-up | median s | peak MiB |",
        "|---|---:|---:|",
    ]
    for name in ("convert_help", "import_convert", "python_baseline"):
        lines.append(f"| {name} | {s[name]['wall_s']:.3f} | {_mib(s[name]['peak_rss_bytes'])} |")
    lines.append(f"\nheavy modules imported by the convert path: {s['heavy_modules_imported_by_convert'] or 'none'}")
    if "importtime" in s:
        lines.append("\n-X importtime, top-level imports by cumulative time:")
        for row in s["importtime"]["by_cumulative_top_level"]:
            lines.append(f"  {row['cumulative_s']:.3f} s  {row['module']}")
        lines.append("-X importtime, by self time:")
        for row in s["importtime"]["by_self"]:
            lines.append(f"  {row['self_s']:.3f} s  {row['module']}")
    lines.append("\ntargets:")
    for t in results["targets"]:
        lines.append(f"  [{'met' if t['met'] else 'NOT met'}] {t['what']}: {t['measured']}")
    return "\n".join(lines)


def targets(results: dict) -> list[dict]:
    out = []
    for rank, r in results["files"].items():
        out.append({"what": f"rank {rank}: old/new >= {TARGET_SPEEDUP:g}x",
                    "measured": f"{r['speedup_old_over_new']:.1f}x", "met": r["speedup_old_over_new"] >= TARGET_SPEEDUP})
        over = r["new_peak_minus_file_bytes"]
        out.append({"what": f"rank {rank}: peak <= file + {_mib(TARGET_MEM_OVER_FILE)} MiB",
                    "measured": f"file + {_mib(over)} MiB", "met": over <= TARGET_MEM_OVER_FILE})
    s = results["startup"]
    for name in ("convert_help", "import_convert"):
        out.append({"what": f"start-up ({name}) < {TARGET_STARTUP_S} s", "measured": f"{s[name]['wall_s']:.3f} s",
                    "met": s[name]["wall_s"] < TARGET_STARTUP_S})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 64])
    p.add_argument("--repeat", type=int, default=3, help="recorded rounds per command (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (warm page cache and imports)")
    p.add_argument("--json", type=Path, help="also write all results as JSON here")
    p.add_argument("--workdir", type=Path, help="generate files here and keep them (default: a temp dir, removed)")
    p.add_argument("--importtime", action="store_true", help="list -X importtime offenders even when fast")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    tmp = None
    if args.workdir:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_convert_")
        workdir = Path(tmp.name)
    try:
        results: dict = {
            "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "cpus": os.cpu_count(), "cli": cli_argv()},
            "repeat": args.repeat, "warmup": args.warmup, "files": {},
        }
        for rank in args.ranks:
            src = workdir / f"sdxl_base_rank{rank}.ckpt"
            if not src.exists():
                t0 = time.perf_counter()
                measure([sys.executable, "-c", GENERATE, str(rank), str(src)])
                print(f"generated {src.name} ({src.stat().st_size / 2**20:.0f} MiB) in "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            results["files"][rank] = bench_file(src, workdir, args.repeat, args.warmup)
        results["startup"] = bench_startup(max(args.repeat, 5), args.warmup, args.importtime)
        results["targets"] = targets(results)
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(render(results))
    if args.json:
        for r in results["files"].values():
            for v in ("new", "old", "cp"):
                r[v].pop("stdout", None)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
