"""``LORA_PARITY_NO_SKIPS`` (set by ``.ci/run``): a test skipped because something this run must have is
missing fails instead, and only the skips listed in ``lora_parity.suite.plugin.ALLOWED_SKIPS`` stay skips.

Shown on tiny test files run by pytest in subprocesses (the plugin registered as the repository's
conftest.py does), and each allowed pattern is checked against the message its condition really
produces, so the list cannot drift from the code that skips.
"""
from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lora_parity.suite.plugin import ALLOWED_SKIPS, NO_SKIPS_ENV, allowed_skip

from .helpers import start_plugin_run

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

def _start(folder: Path, files: dict[str, str], no_skips: bool, dev_suite: bool = True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != NO_SKIPS_ENV}
    if no_skips:
        env[NO_SKIPS_ENV] = "1"
    return start_plugin_run(folder, files, "lora_parity_dev_suite = true\n" if dev_suite else "", env,
                            (f"--junitxml={folder / 'junit.xml'}", "--continue-on-collection-errors"))


def _results(folder: Path, proc: subprocess.Popen) -> dict[str, tuple[str, str]]:
    """{test name: (outcome, message)} from the run's JUnit XML, and ``_returncode``: (code, output tail)."""
    stdout, _ = proc.communicate()
    out = {}
    for case in ET.parse(folder / "junit.xml").getroot().iter("testcase"):
        name = case.get("name")
        kids = [k for k in case if k.tag in ("failure", "error", "skipped")]
        out[name] = (kids[0].tag, (kids[0].get("message") or "") + (kids[0].text or "")) if kids else ("passed", "")
    out["_returncode"] = (str(proc.returncode), stdout[-3000:])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, tuple[str, str]]]:
    """The three runs the tests below read, started together (they are independent):
    ``ci`` (the variable set, the dev suite), ``plain`` (no variable), ``shipped`` (outside the dev suite)."""
    root = tmp_path_factory.mktemp("no_skips")
    plans = {"ci": ({"test_skips.py": TESTS, "test_module_skip.py": MODULE_SKIP}, True, True),
             "plain": ({"test_skips.py": TESTS}, False, True),
             "shipped": ({"test_skips.py": TESTS}, True, False)}
    started = {name: _start(root / name, files, no_skips, dev_suite)
               for name, (files, no_skips, dev_suite) in plans.items()}
    return {name: _results(root / name, proc) for name, proc in started.items()}


def test_unlisted_skip_fails_and_a_listed_one_stays_skipped(runs):
    got = runs["ci"]
    assert got["test_unlisted_skip"][0] == "failure", got
    assert "torch not installed" in got["test_unlisted_skip"][1] and NO_SKIPS_ENV in got["test_unlisted_skip"][1]
    # a skip mark acts in the setup phase: a failed setup is reported as an error
    assert got["test_unlisted_skipif"][0] == "error" and "mindone not installed" in got["test_unlisted_skipif"][1]
    assert got["test_listed_skip"][0] == "skipped", got
    assert got["test_xfail"][0] == "skipped"  # JUnit writes an xfail as skipped: it stays one
    assert got["test_passes"][0] == "passed"
    assert got["_returncode"][0] == "1"


def test_a_module_skipped_at_import_fails_too(runs):
    got = runs["ci"]
    failed = [(k, v) for k, v in got.items() if v[0] in ("failure", "error")
              and "a_framework_that_is_not_installed" in v[1]]
    assert failed and "test_never_collected" not in got, got


def test_without_the_variable_or_outside_the_dev_suite_skips_stay_skips(runs):
    got = runs["plain"]
    assert got["test_unlisted_skip"][0] == got["test_listed_skip"][0] == "skipped", got
    assert got["_returncode"][0] == "0"
    got = runs["shipped"]
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
