"""The ascend layer's logic runs on every CI run: the same tests (lora_parity/suite/test_ascend.py, shipped
with the package), on CPU, tiny bases, generated LoRA."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, ET.Element]:
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "ascend", "lora_parity/suite/test_ascend.py", "-q",
                           "-n", "0", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra],
                          cwd=ROOT, capture_output=True, text=True)
    return proc, ET.parse(junit).getroot()


def test_ascend_layer_runs_on_cpu_and_records_thresholds(tmp_path, monkeypatch):
    """The layer's tests on CPU with ``--sdxl-base random:tiny`` (a base SPEC, generated into a temporary
    cache, both sides built from it) and a generated LoRA."""
    monkeypatch.setenv("LORA_PARITY_CACHE", str(tmp_path / "cache"))
    proc, xml = _run(tmp_path, "--ms-device", "CPU", "--sdxl-base", "random:tiny")
    assert proc.returncode == 0, proc.stdout[-3000:]
    cases = xml.findall(".//testcase")
    assert cases and not xml.findall(".//skipped"), proc.stdout[-2000:]
    props = {p.get("name"): p.get("value") for p in xml.findall(".//property")}
    assert props["mindspore.device_target"] == "CPU"
    assert "tolerance_rel" in props and any(k.startswith("rel_err[") for k in props)


def test_without_npu_the_layer_skips_with_the_reason(tmp_path):
    from lora_parity.device import ascend_present

    if ascend_present()[0]:
        pytest.skip("an Ascend NPU is present here")
    proc, xml = _run(tmp_path, "-rs")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "no Ascend NPU" in proc.stdout
