"""The shipped suite as users run it: ``pytest --pyargs lora_parity --lora-ckpt FILE`` from a folder
outside the repository (the plugin comes from the installed package's ``pytest11`` entry point), on a
real-size MindONE-style LoRA; each realistic fault fails the named test that is about it.  Also: the
option's value given space-separated, a bad path as one usage error, only the suite collected."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import ckpt_io, formats
from lora_parity.convert.layout import PRESETS
from lora_parity.convert.tensor import Tensor

from .faults import write_fullsize_lora

# "suite", not "conversion": each test runs pytest in a subprocess (seconds each); `pytest -m conversion`
# stays the quick layer users run first. Not module-wide: the last test here is a parity/image one.
conversion = pytest.mark.suite

ROOT = Path(__file__).resolve().parents[1]

#: the --lora-ckpt layer's named tests that need no base model (test_user_lora.py, -m conversion)
NAMED = ("test_file_parses", "test_no_nan_or_inf", "test_not_cut_short", "test_layout_detected",
         "test_tensors_fit_the_layout", "test_every_key_maps", "test_coverage_vs_mindone_training",
         "test_rank_and_alpha", "test_lora_b_is_trained", "test_round_trip_ms_peft_ms_bitwise",
         "test_round_trip_ms_kohya_ms_bitwise", "test_diffusers_loads_peft_on_real_size_pipeline",
         "test_diffusers_kohya_path_same_modules")


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == "lora_parity.suite.plugin" for ep in entry_points(group="pytest11"))


def run_pytest(tmp: Path, *args: str, cwd: Path | None = None,
               env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict, float]:
    """pytest in a child process (in ``cwd``, default ``tmp``); (process, test name -> (outcome, message), seconds)."""
    junit = tmp / f"junit_{time.monotonic_ns()}.xml"
    extra = [] if _entry_point_installed() else ["-p", "lora_parity.suite.plugin"]  # not pip-installed here
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=legacy", "-rs",
                           *extra, *args], cwd=cwd or tmp, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)
    seconds = time.perf_counter() - t0
    outcomes = {}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome, message = {"failure": "failed"}.get(tag, tag), node.get("message") or ""
                    break
            outcomes[case.get("name")] = (outcome, message)
    return proc, outcomes, seconds


@pytest.fixture(scope="module")
def fullsize(tmp_path_factory):
    """What MindONE trains at full size (560 UNet attention modules) plus the text encoders' attention,
    written as a MindONE .ckpt outside the repository."""
    d = tmp_path_factory.mktemp("user_loras")
    lora = write_fullsize_lora(PRESETS["sdxl-base"], d / "my_lora.ckpt")
    return d / "my_lora.ckpt", lora


@conversion
def test_entry_point_is_installed():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("lora-parity")
    except PackageNotFoundError:
        pytest.skip("lora-parity is not installed in this environment (pip install -e .)")
    assert _entry_point_installed(), "no pytest11 entry point 'lora_parity' (reinstall: pip install -e .)"


@conversion
def test_every_named_test_runs_on_a_real_size_lora_from_any_folder(tmp_path, fullsize, record_property):
    path, _ = fullsize
    proc, outcomes, seconds = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion",
                                         "--lora-ckpt", str(path))
    record_property("seconds", round(seconds, 1))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = [n for n, (o, _) in outcomes.items() if o == "passed"]
    assert set(NAMED) <= set(passed), f"not passed: {sorted(set(NAMED) - set(passed))}\n{proc.stdout[-3000:]}"
    assert len(passed) >= 10
    assert f"rootdir: {tmp_path}" in proc.stdout  # the value was not taken for a test path
    assert "lora-parity:" in proc.stdout and "layout 'sdxl-base' (detected" in proc.stdout
    assert "MindONE's default (UNet attention q/k/v/out): 560/560" in proc.stdout


@conversion
def test_without_the_option_every_test_skips_naming_it(tmp_path):
    proc, outcomes, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert set(NAMED) <= set(outcomes)
    assert all(o == "skipped" and "--lora-ckpt" in m for o, m in outcomes.values()), outcomes
    assert "add --lora-ckpt PATH" in proc.stdout


# ---------------------------------------------------------------- faults


def _tensors(lora) -> dict:
    return formats.tensors_for(lora, "ms")[0]


def _nan(lora, d: Path) -> Path:
    t = _tensors(lora)
    key = [k for k in t if k.endswith(".lora_B.weight")][300]
    data = t[key].data.copy()
    data.reshape(-1)[7] = np.nan
    t[key] = Tensor(t[key].dtype, data)
    ckpt_io.write_ckpt(d / "nan.ckpt", t)
    return d / "nan.ckpt"


def _truncated(lora, d: Path) -> Path:
    ckpt_io.write_ckpt(d / "full.ckpt", _tensors(lora))
    raw = (d / "full.ckpt").read_bytes()
    (d / "truncated.ckpt").write_bytes(raw[: len(raw) * 2 // 3])  # inside a record
    return d / "truncated.ckpt"


def _cut_at_record_boundary(lora, d: Path, *, between_halves: bool = False) -> Path:
    """The first records only, as a copy or download that stopped between two records leaves it;
    MindSpore writes each tensor as its own record, so this parses."""
    items = list(_tensors(lora).items())
    k = 2 * 300 + (1 if between_halves else 0)  # module 300: inside output_blocks.0
    ckpt_io.write_ckpt(d / "cut.ckpt", dict(items[:k]))
    return d / "cut.ckpt"


def _unmappable(lora, d: Path) -> Path:
    t = _tensors(lora)
    name = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_z"
    t[f"{name}.lora_A.weight"] = Tensor.from_numpy(np.zeros((4, 640), np.float32))
    t[f"{name}.lora_B.weight"] = Tensor.from_numpy(np.zeros((640, 4), np.float32))
    ckpt_io.write_ckpt(d / "unmappable.ckpt", t)
    return d / "unmappable.ckpt"


FAULTS = {
    "nan_tensor": (_nan, "test_no_nan_or_inf", "NaN or Inf"),
    "truncated_inside_a_record": (_truncated, "test_file_parses", "truncated"),
    "cut_at_a_record_boundary": (_cut_at_record_boundary, "test_not_cut_short", "looks partial"),
    "cut_between_lora_a_and_b": (lambda lo, d: _cut_at_record_boundary(lo, d, between_halves=True),
                                 "test_not_cut_short", "has no lora_B"),
    "unmappable_key": (_unmappable, "test_every_key_maps", "to_z"),
}


@conversion
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_file_fails_the_named_test_about_it(tmp_path, fullsize, fault):
    make, culprit, words = FAULTS[fault]
    path = make(fullsize[1], tmp_path)
    proc, outcomes, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion", "--lora-ckpt", str(path))
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = {n: m for n, (o, m) in outcomes.items() if o in ("failed", "error")}
    assert list(failed) == [culprit], f"failed: {sorted(failed)}\n{proc.stdout[-3000:]}"
    assert words in failed[culprit], failed[culprit]
    for name, (outcome, message) in outcomes.items():  # what could not run says why, naming the culprit
        if outcome == "skipped":
            assert culprit in message, (name, message)


SWAP_PLUGIN = """
import sys
import pytest
sys.path.insert(0, {root!r})


def pytest_configure(config):
    from lora_parity.convert.layout import PRESETS
    from tests.faults import plant_keymap_swap

    block = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1."
    plant_keymap_swap(pytest.MonkeyPatch(), PRESETS["sdxl-base"], block + "to_q", block + "to_k")
"""


@conversion
def test_a_key_map_swap_is_caught_by_diffusers_own_kohya_path(tmp_path, fullsize):
    """A key map sending to_q's LoRA to to_k and back in one block: symmetric, so the round trips and the
    PEFT load (which follow the same map) pass; diffusers' own SGM-name mapping of the kohya file does not."""
    (tmp_path / "plant_swap.py").write_text(SWAP_PLUGIN.format(root=str(ROOT)))
    proc, outcomes, _ = run_pytest(tmp_path, "-p", "plant_swap", "--pyargs", "lora_parity", "-m", "conversion",
                                   "--lora-ckpt", str(fullsize[0]), env={"PYTHONPATH": str(tmp_path)})
    failed = {n: m for n, (o, m) in outcomes.items() if o in ("failed", "error")}
    assert list(failed) == ["test_diffusers_kohya_path_same_modules"], f"{sorted(failed)}\n{proc.stdout[-3000:]}"
    assert "attn1.to_q" in failed["test_diffusers_kohya_path_same_modules"]
    assert outcomes["test_round_trip_ms_peft_ms_bitwise"][0] == "passed"


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def sd_lora(request, tmp_path_factory):
    """A real-size MindONE SD 1.5 / 2.1 LoRA as its LDM port saves it (lora_down / lora_up, lora_rank), run with
    --lora_scale 0.5."""
    from .test_families import ldm_module_names, write_mindone_ldm_lora
    from lora_parity.fixtures.synthetic import make_lora

    layout = PRESETS[request.param]
    lora = make_lora(layout, rank=4, alpha=2.0, modules=ldm_module_names(layout), seed=8)
    path = tmp_path_factory.mktemp(f"user_{request.param}") / "my_sd_lora.ckpt"
    return request.param, write_mindone_ldm_lora(path, lora), lora


@conversion
def test_every_named_test_runs_on_a_real_size_sd_lora(tmp_path, sd_lora):
    """The family is detected from the file and the same named checks run for it: SD 1.x / 2.x round trips
    through MindONE's LDM spelling, diffusers loads both files on a real-size hollow StableDiffusionPipeline."""
    preset, path, _ = sd_lora
    proc, outcomes, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion",
                                   "--lora-ckpt", str(path), "--lora-scale", "0.5")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = [n for n, (o, _) in outcomes.items() if o == "passed"]
    assert set(NAMED) <= set(passed), f"not passed: {sorted(set(NAMED) - set(passed))}\n{proc.stdout[-3000:]}"
    family = {"sd15": "sd1", "sd21": "sd2"}[preset]
    assert f"layout '{preset}' (detected" in proc.stdout and f"family {family}" in proc.stdout
    assert "scale alpha/rank: 0.5" in proc.stdout and "(--lora-scale x rank)" in proc.stdout


@conversion
def test_sd_lora_with_a_mindone_rank_record_that_lies_fails_where_it_is_read(tmp_path, sd_lora):
    _, path, _ = sd_lora
    tensors = ckpt_io.read_ckpt(path)
    tensors["lora_rank"] = Tensor("I64", np.array(8, dtype=np.int64).reshape(()))
    bad = tmp_path / "bad.ckpt"
    ckpt_io.write_ckpt(bad, tensors)
    proc, outcomes, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion", "--lora-ckpt", str(bad))
    failed = {n: m for n, (o, m) in outcomes.items() if o in ("failed", "error")}
    assert list(failed) == ["test_file_parses"] and "lora_rank 8" in failed["test_file_parses"], failed


@pytest.mark.parity
@pytest.mark.image
def test_tiny_sd_lora_with_a_base_runs_on_mindone(tmp_path):
    """``--base`` (the new name of ``--sdxl-base``) with an SD LoRA: the shipped parity/image test judges
    mindone.diffusers on it (the port is SDXL-only) and passes; ``--ms-backend port`` says why it cannot."""
    from .test_families import ldm_module_names, write_mindone_ldm_lora
    from lora_parity.convert.layout import tiny_sd_layout
    from lora_parity.fixtures.synthetic import make_lora

    layout = tiny_sd_layout("sd1")
    path = write_mindone_ldm_lora(tmp_path / "tiny_sd_lora.ckpt",
                                  make_lora(layout, rank=4, modules=ldm_module_names(layout), seed=4))
    args = ["--pyargs", "lora_parity", "-m", "parity or image", "--lora-ckpt", str(path), "--lora-layout", "tiny-sd1",
            "--lora-scale", "0.5", "--base", "random:tiny-sd1"]
    env = {"LORA_PARITY_CACHE": str(tmp_path / "cache")}
    proc, outcomes, _ = run_pytest(tmp_path, *args, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert outcomes["test_parity_and_image_on_your_base"][0] == "passed", outcomes
    proc, outcomes, _ = run_pytest(tmp_path, *args, "--ms-backend", "port", env=env)
    outcome, message = outcomes["test_parity_and_image_on_your_base"]
    assert outcome == "skipped" and "the port runs SDXL only" in message, outcomes


# ---------------------------------------------------------------- command line


@conversion
def test_missing_or_unreadable_path_is_one_usage_error(tmp_path):
    for value, words in ((str(tmp_path / "nowhere.ckpt"), "no such file"), (str(tmp_path), "not a file")):
        proc, _, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "--lora-ckpt", value)
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert f"--lora-ckpt {value}: {words}" in proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr and "collected" not in proc.stdout
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.ckpt"
        locked.write_bytes(b"x")
        locked.chmod(0)
        proc, _, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "--lora-ckpt", str(locked))
        assert proc.returncode == 4 and "cannot be read" in proc.stderr


@conversion
def test_space_separated_path_in_the_repository_keeps_its_configuration(tmp_path, fullsize):
    """``pytest -m ascend --lora-ckpt /abs/outside/x.ckpt``: pytest locates rootdir and ini file before
    plugins load and took the path for a test path (rootdir /abs/outside, no pytest.ini, unknown
    option); the plugin locates them again."""
    path, _ = fullsize
    proc, _, _ = run_pytest(tmp_path, "-m", "ascend", "--lora-ckpt", str(path), "--co", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"rootdir: {ROOT}" in proc.stdout and "configfile: pytest.ini" in proc.stdout
    assert "test_ascend.py" in proc.stdout and "<Function test_layer_parity_on_device>" in proc.stdout
    proc, _, _ = run_pytest(tmp_path, "-m", "conversion", "--lora-ckpt", str(path), "--co", "-q", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "lora_parity/suite/test_user_lora.py::test_file_parses" in proc.stdout
    assert "tests/test_keymap.py::" in proc.stdout


@conversion
def test_pyargs_collects_only_the_shipped_suite(tmp_path):
    for extra in ((), ("-o", "python_files=*.py")):  # even where every .py file is a test file
        proc, _, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "--co", "-q", *extra)
        assert proc.returncode == 0, proc.stdout[-3000:]
        ids = [line for line in proc.stdout.splitlines() if "::" in line]
        assert ids and all(Path(i.split("::")[0]).name in ("test_user_lora.py", "test_ascend.py") for i in ids), ids


@conversion
def test_the_repository_runs_without_the_entry_point(tmp_path):
    """No ``pip install`` (or autoload off): the repository's conftest.py registers the plugin itself."""
    proc, _, _ = run_pytest(tmp_path, "-p", "pytest_benchmark.plugin", "--co", "-q", "-m", "conversion",
                            "--tol-f32", "1e-3", "tests/test_keymap.py", cwd=ROOT,
                            env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "test_keymap.py::" in proc.stdout


# ---------------------------------------------------------------- with a base model


@pytest.mark.parity
@pytest.mark.image
def test_with_a_base_the_parity_and_image_test_runs(tmp_path):
    """``--sdxl-base random:tiny`` (generated into a temporary cache) and a tiny LoRA (``--lora-layout tiny``):
    the shipped parity/image test runs compare on it and passes."""
    from lora_parity.fixtures.synthetic import make_lora, write_ms_lora
    from lora_parity.convert.layout import tiny_layout

    path = write_ms_lora(tmp_path / "tiny_lora.ckpt", make_lora(tiny_layout(), rank=4, seed=3))
    proc, outcomes, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "parity or image",
                                   "--lora-ckpt", str(path), "--lora-layout", "tiny", "--sdxl-base", "random:tiny",
                                   env={"LORA_PARITY_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert outcomes["test_parity_and_image_on_your_base"][0] == "passed", outcomes
