"""Seconds the suite spends per layer, from a JUnit file written with this repository's pytest.ini.

    python scripts/suite_times.py reports/junit.xml [more.xml ...]
    python scripts/suite_times.py --file-seconds tests/file_seconds.json reports/junit.xml


Each test case carries a ``layer`` property (lora_parity.suite.plugin.layer_of: its heaviest layer marker);
the table sums the test times per layer (setup and teardown included, as pytest's JUnit counts them), with
the count of tests and the slowest one.  Measured numbers for the README and the closing notes come from here.
``--file-seconds OUT`` also writes each test file's seconds (JSON, path -> seconds): the order in which
``make test`` hands files to its xdist workers (lora_parity.suite.plugin.xdist_order), longest first.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def layer_times(paths: list[Path]) -> tuple[dict[str, list[tuple[float, str]]], float]:
    """layer -> [(seconds, test id)], and the wall time the files record."""
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    wall = 0.0
    for path in paths:
        root = ET.parse(path).getroot()
        for suite in root.iter("testsuite"):
            wall += float(suite.get("time") or 0.0)
        for case in root.iter("testcase"):
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            name = f"{case.get('classname')}::{case.get('name')}"
            out[props.get("layer", "other")].append((float(case.get("time") or 0.0), name))
    return out, wall


def file_seconds(times: dict[str, list[tuple[float, str]]]) -> dict[str, float]:
    """Test file (path from the repository root, as pytest's node ids) -> its tests' seconds."""
    out: dict[str, float] = defaultdict(float)
    for cases in times.values():
        for sec, name in cases:
            out[_test_file(name.split("::", 1)[0])] += sec
    return {k: round(v, 1) for k, v in sorted(out.items())}


def _test_file(classname: str) -> str:
    """``tests.test_x`` or ``tests.test_x.TestClass`` -> ``tests/test_x.py`` (the longest prefix that is a file)."""
    parts = classname.split(".")
    for n in range(len(parts), 0, -1):
        path = "/".join(parts[:n]) + ".py"
        if Path(path).is_file():
            return path
    return "/".join(parts) + ".py"


def main(argv: list[str]) -> int:
    out = None
    if argv[:1] == ["--file-seconds"] and len(argv) > 1:
        out, argv = Path(argv[1]), argv[2:]
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    times, wall = layer_times([Path(a) for a in argv])
    if out is not None:
        out.write_text(json.dumps(file_seconds(times), indent=1) + "\n")
    total = sum(t for cases in times.values() for t, _ in cases)
    print(f"{'layer':<12}{'tests':>7}{'seconds':>10}{'share':>8}  slowest")
    for layer, cases in sorted(times.items(), key=lambda kv: -sum(t for t, _ in kv[1])):
        sec = sum(t for t, _ in cases)
        worst = max(cases)
        print(f"{layer:<12}{len(cases):>7}{sec:>10.1f}{sec / total:>8.0%}  {worst[0]:.1f} s {worst[1]}")
    print(f"{'total':<12}{sum(map(len, times.values())):>7}{total:>10.1f}          wall time recorded: {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
