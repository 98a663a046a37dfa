"""``LORA_PARITY_NO_SKIPS`` (set by ``.ci/run``): a test skipped because something this run must have is
missing fails instead, and only the skips listed in ``lora_parity.suite.plugin.ALLOWED_SKIPS`` stay skips.

Shown on a tiny test file run by pytest in a subprocess (the plugin registered as the repository's
conftest.py does), and each allowed pattern is checked against the message its condition really
produces, so the list cannot drift from the code that skips.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lora_parity.suite.plugin import ALLOWED_SKIPS, NO_SKIPS_ENV, allowed_skip

pytestmark = pytest.mark.conversion

TESTS = '''
import pytest

def test_unlisted_skip():
    pytest.skip("torch not installed in /usr/bin/python")

def test_listed_skip():
    pytest.skip("no Ascend NPU on this machine (no /dev/davinci*)")

@pytest.mark.skipif(True, reason="mindone not installed")
def test_unlisted_skipif():
    pass

@pytest.mark.xfail(strict=True, reason="an expected failure is no skip")
def test_xfail():
    assert False

def test_passes():
    pass
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("a_framework_that_is_not_installed")

def test_never_collected():
    pass
'''

CONFTEST = '''
def pytest_addhooks(pluginmanager):
    from lora_parity.suite import plugin

    if not pluginmanager.is_registered(plugin) and not pluginmanager.is_blocked(plugin.NAME):
        pluginmanager.register(plugin, plugin.NAME)
'''


def _run(tmp_path: Path, files: dict[str, str], no_skips: bool, dev_suite: bool = True) -> dict[str, tuple[str, str]]:
    """{test name: (outcome, message)} from the JUnit XML of a pytest run on ``files`` in ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, text in {**files, "conftest.py": CONFTEST}.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n" + ("lora_parity_dev_suite = true\n" if dev_suite else ""))
    env = {k: v for k, v in os.environ.items() if k != NO_SKIPS_ENV}
    if no_skips:
        env[NO_SKIPS_ENV] = "1"
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name")
        kids = [k for k in case if k.tag in ("failure", "error", "skipped")]
        out[name] = (kids[0].tag, (kids[0].get("message") or "") + (kids[0].text or "")) if kids else ("passed", "")
    out["_returncode"] = (str(proc.returncode), proc.stdout[-3000:])
    return out


def test_unlisted_skip_fails_and_a_listed_one_stays_skipped(tmp_path):
    got = _run(tmp_path, {"test_skips.py": TESTS}, no_skips=True)
    assert got["test_unlisted_skip"][0] == "failure", got
    assert "torch not installed" in got["test_unlisted_skip"][1] and NO_SKIPS_ENV in got["test_unlisted_skip"][1]
    # a skip mark acts in the setup phase: a failed setup is reported as an error
    assert got["test_unlisted_skipif"][0] == "error" and "mindone not installed" in got["test_unlisted_skipif"][1]
    assert got["test_listed_skip"][0] == "skipped", got
    assert got["test_xfail"][0] == "skipped"  # JUnit writes an xfail as skipped: it stays one
    assert got["test_passes"][0] == "passed"
    assert got["_returncode"][0] == "1"


def test_a_module_skipped_at_import_fails_too(tmp_path):
    got = _run(tmp_path, {"test_module_skip.py": MODULE_SKIP}, no_skips=True)
    failed = [(k, v) for k, v in got.items() if v[0] in ("failure", "error")]
    assert failed and "a_framework_that_is_not_installed" in failed[0][1][1], got


def test_without_the_variable_or_outside_the_dev_suite_skips_stay_skips(tmp_path):
    got = _run(tmp_path / "plain", {"test_skips.py": TESTS}, no_skips=False)
    assert got["test_unlisted_skip"][0] == got["test_listed_skip"][0] == "skipped", got
    assert got["_returncode"][0] == "0"
    got = _run(tmp_path / "shipped", {"test_skips.py": TESTS}, no_skips=True, dev_suite=False)
    assert got["test_unlisted_skip"][0] == "skipped", got


def test_each_allowed_pattern_matches_the_real_message():
    pytest.importorskip("mindspore")
    from lora_parity import device
    from lora_parity.backends.port.view import MindSporeBackend
    from lora_parity.backends.registry import _ms_supports
    from lora_parity.suite.test_user_lora import NO_OPTION

    present, why = device.ascend_present()
    messages = {
        "no Ascend NPU": why if not present else "no Ascend NPU on this machine (no /dev/davinci*)",
        "bf16 (registry)": _ms_supports("BF16", "CPU")[1],
        "bf16 (port)": MindSporeBackend.supports("BF16", "CPU")[1],
        "no --lora-ckpt": NO_OPTION,
    }
    assert all(allowed_skip(m) for m in messages.values()), messages
    assert len(ALLOWED_SKIPS) == 3  # no NPU, bf16 on CPU, no --lora-ckpt: adding one is a decision, not a fix
    for unlisted in ("--ms-backend mindone: mindspore, mindone not installed in /x/python",
                     "lora-parity is not installed in this environment (pip install -e .)",
                     "could not import 'torch': No module named 'torch'"):
        assert allowed_skip(unlisted) is None
