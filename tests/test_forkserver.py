"""A side started as a fork of a warm server (``lora_parity/sides/forkserver.py``) behaves as a fresh
interpreter does: same output bytes, exit code, working folder and arguments, the same one-line error from a
failing side; servers are reused only for the same interpreter, backend and environment (a planted fault's
``PYTHONPATH`` / variables get a server of their own), and ``LORA_PARITY_SIDE_START=spawn`` turns them off."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_parity.errors import LoraParityError
from lora_parity.sides import forkserver
from lora_parity.sides.request import SideRequest
from lora_parity.sides.run import run_side
from lora_parity.sides.threads import THREADS_ENV, thread_limit

from .helpers import PLUGIN_CONFTEST, start_plugin_run

ROOT = Path(__file__).resolve().parents[1]

BACKEND = "port"  # the lightest warm server (MindSpore's imports)
# python -m json.tool: a module whose output, errors and exit codes (0 / 1 / 2) are fixed by the standard library
JOBS = (["--sort-keys", "in.json"], ["bad.json"], ["missing.json"])


@pytest.fixture
def folder(tmp_path, monkeypatch):
    (tmp_path / "in.json").write_text('{"b": 1, "a": [2]}')
    (tmp_path / "bad.json").write_text("{bad")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    forkserver.close_all()


@pytest.mark.parametrize("argv", JOBS, ids=("ok", "exception", "usage_error"))
def test_a_forked_job_is_byte_for_byte_a_fresh_interpreter(folder, capfd, argv):
    code = forkserver.run_forked(sys.executable, BACKEND, argv, module="json.tool")
    forked = capfd.readouterr()
    fresh = subprocess.run([sys.executable, "-m", "json.tool", *argv], capture_output=True, text=True)
    assert code == fresh.returncode
    assert (forked.out, forked.err) == (fresh.stdout, fresh.stderr)


def test_servers_are_reused_per_environment_and_restarted_when_gone(folder, monkeypatch, capfd):
    forkserver.close_all()
    argv = ["--sort-keys", "in.json"]
    assert forkserver.run_forked(sys.executable, BACKEND, argv, module="json.tool") == 0
    (first,) = forkserver._servers.values()
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test")  # volatile: same server
    assert forkserver.run_forked(sys.executable, BACKEND, argv, module="json.tool") == 0
    assert list(forkserver._servers.values()) == [first]
    monkeypatch.setenv("LORA_PARITY_TEST_FAULT", "some_fault")  # what a side may read at import: a new server
    assert forkserver.run_forked(sys.executable, BACKEND, argv, module="json.tool") == 0
    assert len(forkserver._servers) == 2
    monkeypatch.delenv("LORA_PARITY_TEST_FAULT")
    first.proc.kill()
    first.proc.wait()
    assert forkserver.run_forked(sys.executable, BACKEND, argv, module="json.tool") == 0  # a new server
    assert first not in forkserver._servers.values()
    capfd.readouterr()


def test_a_failing_side_gives_the_same_one_line_error_forked_or_fresh(tmp_path, monkeypatch):
    req = SideRequest(side="ms", pipeline_dir=str(tmp_path / "no_such_pipeline"), backend=BACKEND,
                      arrays={"latents": __import__("numpy").zeros((1, 4, 8, 8), "float32")})
    with pytest.raises(LoraParityError) as forked:
        run_side(req)
    monkeypatch.setenv(forkserver.START_ENV, "spawn")
    assert not forkserver.use_fork_server()
    with pytest.raises(LoraParityError) as fresh:
        run_side(req)
    assert str(forked.value) == str(fresh.value)
    assert "\n" not in str(forked.value)
    forkserver.close_all()


@pytest.mark.parametrize("value, ok", [("2", 2), ("", None), ("two", "whole number"), ("0", "at least 1")])
def test_the_thread_cap_is_a_whole_number_or_one_clear_error(monkeypatch, value, ok):
    monkeypatch.setenv(THREADS_ENV, value)
    if ok is None or isinstance(ok, int):
        assert thread_limit() == ok
        return
    with pytest.raises(LoraParityError, match=ok) as exc:
        thread_limit()
    assert THREADS_ENV in str(exc.value)


@pytest.mark.parametrize("workers, user_set, want", [("2", None, "share"), ("2", "3", "3"), ("", None, None)])
def test_xdist_workers_share_the_cores(monkeypatch, workers, user_set, want):
    """Under pytest-xdist the plugin caps each worker's sides at cores / workers; a cap the user set stays,
    and a plain pytest run imposes none."""
    from lora_parity.sides.threads import cores
    from lora_parity.suite import plugin

    _as_xdist_worker(monkeypatch, workers, "gw0" if workers else "", user_set)
    plugin._share_cores_between_workers()
    expected = str(max(1, cores() // 2)) if want == "share" else want
    assert os.environ.get(THREADS_ENV) == expected


@pytest.mark.parametrize("allowed, workers, worker, user_set, bound", [
    ({0, 1}, "2", "gw0", None, [0]), ({0, 1}, "2", "gw1", None, [1]), ({4, 5, 6, 7}, "2", "gw1", None, [5, 7]),
    ({0, 1, 2}, "2", "gw0", None, [0, 2]),  # no core left out
    ({0, 1}, "4", "gw3", None, None),  # more workers than cores: they must share
    ({0, 1}, "2", "gw1", "2", None),   # the user's own thread setting: left alone
    ({0, 1}, "", "", None, None)])     # not under xdist
def test_xdist_workers_are_bound_to_their_own_cores(monkeypatch, allowed, workers, worker, user_set, bound):
    """Each worker (and so every side it starts) runs on cores of its own, so MindSpore's busy-waiting threads
    only take time from their own worker."""
    from lora_parity.suite import plugin

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
    calls = _as_xdist_worker(monkeypatch, workers, worker, user_set)
    plugin._share_cores_between_workers()
    assert calls == ([(0, bound)] if bound else [])


def _as_xdist_worker(monkeypatch, workers: str, worker: str, user_set: str | None) -> list:
    """The environment of xdist worker ``worker`` of ``workers``; binding to cores is recorded, never done (it
    would bind the process running these tests)."""
    calls: list = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: calls.append((pid, list(cpus))))
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    if user_set:
        monkeypatch.setenv(THREADS_ENV, user_set)
    return calls


class _Item:
    def __init__(self, nodeid: str, fullsize: bool = False):
        self.nodeid, self.fullsize = nodeid, fullsize

    def get_closest_marker(self, name):
        return object() if name == "fullsize" and self.fullsize else None


def test_xdist_hands_out_the_full_size_file_first_then_the_longest_files():
    """make test runs --no-loadscope-reorder: the plugin's order is the order files reach the workers."""
    from lora_parity.suite.plugin import FILE_SECONDS, _file_seconds, xdist_order

    items = [_Item("tests/a.py::x"), _Item("tests/b.py::x"), _Item("tests/b.py::y"), _Item("tests/c.py::x"),
             _Item("tests/test_fullsize.py::base", True), _Item("tests/test_fullsize.py::fault", True),
             _Item("tests/d.py::x"), _Item("tests/d.py::y"), _Item("tests/d.py::z")]
    full = ["tests/test_fullsize.py::base", "tests/test_fullsize.py::fault"]
    # nothing measured: one second per test
    order = [i.nodeid for i in xdist_order(items)]
    assert order == [*full, "tests/d.py::x", "tests/d.py::y", "tests/d.py::z", "tests/b.py::x", "tests/b.py::y",
                     "tests/a.py::x", "tests/c.py::x"]
    # measured: longest first (c.py measured 30 s; a.py not measured, 1 s; the full-size file first whatever)
    seconds = {"tests/c.py": 30.0, "tests/d.py": 2.0, "tests/b.py": 12.0, "tests/test_fullsize.py": 1.0}
    order = [i.nodeid for i in xdist_order(items, seconds)]
    assert order == [*full, "tests/c.py::x", "tests/b.py::x", "tests/b.py::y", "tests/d.py::x", "tests/d.py::y",
                     "tests/d.py::z", "tests/a.py::x"]
    assert sorted(order) == sorted(i.nodeid for i in items)
    # the committed table names test files that exist
    table = _file_seconds(ROOT / FILE_SECONDS)
    missing = sorted(p for p in table if not (ROOT / p).is_file())
    assert table and not missing, missing


def test_file_seconds_sum_each_test_files_cases_from_the_junit_file(tmp_path, monkeypatch):
    """What make test's xdist order reads: seconds per test file, summed over its cases (setup included)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("suite_times", ROOT / "scripts" / "suite_times.py")
    suite_times = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite_times)
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite time="9">'
        '<testcase classname="tests.test_keymap" name="a" time="1.5"/>'
        '<testcase classname="tests.test_keymap" name="b" time="2.0"/>'
        '<testcase classname="lora_parity.suite.test_user_lora" name="c" time="0.25"/>'
        '</testsuite></testsuites>')
    out = tmp_path / "seconds.json"
    monkeypatch.chdir(ROOT)  # test files are found from the repository root, as pytest's node ids name them
    assert suite_times.main(["--file-seconds", str(out), str(junit)]) == 0
    assert json.loads(out.read_text()) == {"lora_parity/suite/test_user_lora.py": 0.2, "tests/test_keymap.py": 3.5}


PLAIN_RUN = '''
def test_not_registered_outside_the_dev_suite():
    import gc

    from lora_parity.sides.memory import GC_YOUNG_THRESHOLD
    from lora_parity.suite import plugin

    assert not plugin._EXIT_FREEZE_REGISTERED
    assert gc.get_threshold()[0] != GC_YOUNG_THRESHOLD
'''


def test_the_exit_skips_cycle_hunts_only_in_this_suites_runs(tmp_path):
    """The plugin's exit handler (``gc.freeze`` at exit) and its rarer young-generation collections are set
    in the dev suite (this run) and with ``--lora-ckpt``, and in no other project's run of the environment (a
    pytest run without either)."""
    import gc

    from lora_parity.sides.memory import GC_YOUNG_THRESHOLD
    from lora_parity.suite import plugin

    assert plugin._EXIT_FREEZE_REGISTERED
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    proc = start_plugin_run(tmp_path, {"test_plain.py": PLAIN_RUN})
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]


DEV_SUITE_RUN = '''
def test_set_for_the_run():
    import gc

    from lora_parity.sides.memory import GC_YOUNG_THRESHOLD

    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
'''


def test_rarer_collections_last_the_run_and_are_put_back_after_it(tmp_path):
    """A caller of ``pytest.main`` in a long-lived process gets its own thresholds back when the run ends (the
    dev suite's run sets them); ``rarer_collections`` puts them back even when its block raises."""
    import gc

    from lora_parity.sides.memory import GC_YOUNG_THRESHOLD, rarer_collections

    for name, text in {"test_dev.py": DEV_SUITE_RUN, "conftest.py": PLUGIN_CONFTEST,
                       "pytest.ini": "[pytest]\nlora_parity_dev_suite = true\n"}.items():
        (tmp_path / name).write_text(text)
    code = f"""
import gc
import pytest
gc.set_threshold(123, 7, 9)
code = pytest.main(["-q", "-p", "no:cacheprovider", {str(tmp_path)!r}])
assert code == 0, code
assert gc.get_threshold() == (123, 7, 9), gc.get_threshold()
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_thresholds = gc.get_threshold()
    gc.set_threshold(123, 7, 9)
    try:
        with pytest.raises(RuntimeError), rarer_collections():
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 7, 9)
            raise RuntimeError("the block failed")
        assert gc.get_threshold() == (123, 7, 9)
    finally:
        gc.set_threshold(*run_thresholds)
