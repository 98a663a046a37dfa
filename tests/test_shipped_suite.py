"""The shipped suite as users run it: ``pytest --pyargs lora_parity --lora-ckpt FILE`` from a folder
outside the repository (the plugin comes from the installed package's ``pytest11`` entry point), on a
real-size MindONE-style LoRA; each realistic fault fails the named test that is about it.  Also: the
option's value given space-separated, a bad path as one usage error, only the suite collected."""
from __future__ import annotations

import os
import re
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


def run_pytest(tmp: Path, *args: str, cwd: Path | None = None, env: dict | None = None,
               props: dict | None = None) -> tuple[subprocess.CompletedProcess, dict, float]:
    """pytest in a child process (in ``cwd``, default ``tmp``); (process, test name -> (outcome, message), seconds).
    ``props``, if given, is filled with test name -> {JUnit property: value} (values as the XML holds them)."""
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
            if props is not None:
                props[case.get("name")] = {pr.get("name"): pr.get("value") for pr in case.iter("property")}
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


# ---------------------------------------------------------------- SD3 and Flux

#: what mindone.diffusers' trainers adapt by default (train_dreambooth_lora_sd3.py: to_k/q/v/to_out.0; _flux.py
#: without --lora_layers: both streams' attention, the double blocks' feed-forwards, hence also the single blocks'
#: attn.to_q/k/v), written here independently of the suite's own table, plus CLIP-L attention (--train_text_encoder)
FLOW_DEFAULT = {
    "sd3": re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.(?:to_[qkv]|to_out\.0)$"),
    "flux": re.compile(r"^transformer\.(?:single_)?transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|to_out\.0|"
                       r"add_[qkv]_proj|to_add_out)|ff(?:_context)?\.net\.(?:0\.proj|2))$"),
}
#: SD3-medium: 24 joint blocks x 4; FLUX.1-dev: 19 double blocks x 12 + 38 single blocks x 3
FLOW_DEFAULT_COUNT = {"sd3": 96, "flux": 342}
#: the named checks that do not exist for the family, and the words their skip reason says
FLOW_NOT_APPLICABLE = {
    "sd3": {"test_round_trip_ms_peft_ms_bitwise": "no .ckpt LoRA format for sd3",
            "test_diffusers_kohya_path_same_modules": "diffusers reads no kohya SD3 file"},
    "flux": {"test_round_trip_ms_peft_ms_bitwise": "no .ckpt LoRA format for flux"},
}
CLIP_L_ATTENTION = re.compile(r"^text_encoder\.text_model\.encoder\.layers\.\d+\.self_attn\.")


def flow_lora(family: str, *, rank: int = 4, alpha: float = 8.0, seed: int = 11):
    """A real-size SD3-medium / FLUX.1-dev LoRA on the trainer's default modules plus CLIP-L attention, float16 as
    mixed-precision training saves it, alpha != rank (scale 2), lora_B non-zero: a trained LoRA."""
    import dataclasses

    from lora_parity.convert.keymap import keymap_for
    from lora_parity.fixtures.synthetic import make_lora

    layout = PRESETS[family]
    names = [e.sgm for e in keymap_for(layout).lora_entries()
             if FLOW_DEFAULT[family].match(e.sgm) or CLIP_L_ATTENTION.match(e.sgm)]
    lora = make_lora(layout, rank=rank, alpha=alpha, modules=names, dtype="F16", seed=seed, b_std=0.05)
    return dataclasses.replace(lora, source_format="peft")


def write_flow_peft(path: Path, lora) -> Path:
    """The PEFT safetensors mindone.diffusers' ``save_lora_weights`` writes: ``transformer.`` / ``text_encoder.``
    + module + ``.lora_A.weight`` / ``.lora_B.weight``, alpha in ``lora_adapter_metadata``."""
    from lora_parity.convert.safetensors_io import write_safetensors

    write_safetensors(path, *formats.tensors_for(lora, "peft"))
    return path


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow_peft(request, tmp_path_factory):
    family = request.param
    lora = flow_lora(family)
    path = write_flow_peft(tmp_path_factory.mktemp(f"user_{family}") / "pytorch_lora_weights.safetensors", lora)
    return family, path, lora


def _assert_flow_run(family, proc, outcomes, props, *, n_modules: int):
    """Every named check that exists for the family passed; each one that does not is skipped naming the family."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    na = FLOW_NOT_APPLICABLE[family]
    assert set(NAMED) <= set(outcomes), sorted(set(NAMED) - set(outcomes))
    for name in NAMED:
        outcome, message = outcomes[name]
        if name in na:
            assert outcome == "skipped" and na[name] in message and family in message, (name, outcome, message)
        else:
            assert outcome == "passed", (name, outcome, message, proc.stdout[-3000:])
    assert props["test_layout_detected"]["family"] == family
    assert props["test_layout_detected"]["layout"] == family
    cov = props["test_coverage_vs_mindone_training"]
    assert cov["coverage.mindone_default"] == cov["coverage.mindone_default_covered"] == str(FLOW_DEFAULT_COUNT[family])
    assert props["test_diffusers_loads_peft_on_real_size_pipeline"]["diffusers_modules"] == str(n_modules)
    assert props["test_round_trip_ms_kohya_ms_bitwise"]["tensors_compared"] == str(2 * n_modules)
    assert props["test_rank_and_alpha"]["scales"] == "[2.0]"
    assert f"layout '{family}' (detected" in proc.stdout and f"family {family}" in proc.stdout


@conversion
def test_every_named_test_runs_on_a_real_size_flow_peft_lora(tmp_path, flow_peft, record_property):
    """An SD3 / Flux PEFT file as mindone.diffusers saves it: the family is detected and recorded, every check that
    exists for it passes (diffusers' own loader on a real-size hollow SD3 / Flux pipeline included), the coverage
    is judged against that family's trainer defaults, and the checks that do not exist for it say so by family."""
    family, path, lora = flow_peft
    props: dict = {}
    proc, outcomes, seconds = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion",
                                         "--lora-ckpt", str(path), props=props)
    record_property("seconds", round(seconds, 1))
    _assert_flow_run(family, proc, outcomes, props, n_modules=len(lora.pairs))
    what = {"sd3": "transformer attention to_q/k/v/to_out.0",
            "flux": "double blocks' attention + feed-forwards, single blocks' attention"}[family]
    assert f"MindONE's default ({what}): {FLOW_DEFAULT_COUNT[family]}/{FLOW_DEFAULT_COUNT[family]}" in proc.stdout
    if family == "flux":  # diffusers' Flux kohya reader: the double blocks' feed-forwards (19 x 4) it cannot map
        kohya = props["test_diffusers_kohya_path_same_modules"]
        assert kohya["kohya_not_read_by_diffusers"] == "76"
        assert kohya["diffusers_modules"] == str(len(lora.pairs) - 76)
        assert "76 not read by diffusers' flux kohya reader" in proc.stdout and "LoraCheckScopeWarning" in proc.stdout


@conversion
def test_every_named_test_runs_on_a_kohya_flux_lora(tmp_path, record_property):
    """The same LoRA in ComfyUI's kohya names (``lora_transformer_``, written by the converter): detected as Flux
    from its names and shapes; PEFT -> kohya -> PEFT round-trips through its PEFT conversion and every tensor of
    the file went in unchanged; diffusers' own kohya reader takes the part it maps."""
    from lora_parity.convert.converter import ConvertOptions, convert

    lora = flow_lora("flux", seed=12)
    peft = write_flow_peft(tmp_path / "peft.safetensors", lora)
    kohya = tmp_path / "my_flux_lora_kohya.safetensors"
    convert(ConvertOptions(src=peft, dst=kohya, fmt="kohya"))
    props: dict = {}
    proc, outcomes, seconds = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion",
                                         "--lora-ckpt", str(kohya), props=props)
    record_property("seconds", round(seconds, 1))
    _assert_flow_run("flux", proc, outcomes, props, n_modules=len(lora.pairs))
    assert props["test_file_parses"]["lora_format"] == "kohya"
    assert props["test_round_trip_ms_kohya_ms_bitwise"]["compared_with_file_keys"] == str(3 * len(lora.pairs))


def _flow_tensors(lora) -> dict:
    return formats.tensors_for(lora, "peft")


def _write(d: Path, name: str, tensors: dict, meta: dict) -> Path:
    from lora_parity.convert.safetensors_io import write_safetensors

    write_safetensors(d / name, tensors, meta)
    return d / name


#: per family: (a module the real-size model does not have, a module whose lora_B gets rank 8, the hidden size)
FAULT_MODULES = {
    # SD3-medium has joint blocks 0-23 (SD3.5-large has 38): a LoRA mixed from another model
    "sd3": ("transformer.transformer_blocks.24.attn.to_q", "transformer.transformer_blocks.5.attn.to_v", 1536),
    # FLUX.1-dev has single blocks 0-37
    "flux": ("transformer.single_transformer_blocks.38.attn.to_q", "transformer.single_transformer_blocks.7.attn.to_k",
             3072),
}


def _flow_module_that_does_not_exist(family, lora, d: Path) -> Path:
    t, meta = _flow_tensors(lora)
    module, _, hidden = FAULT_MODULES[family]
    for half, shape in (("A", (4, hidden)), ("B", (hidden, 4))):
        t[f"{module}.lora_{half}.weight"] = Tensor.from_numpy(np.full(shape, 0.01, np.float32), "F16")
    return _write(d, "extra_block.safetensors", t, meta)


def _flow_truncated(family, lora, d: Path) -> Path:
    raw = write_flow_peft(d / "whole.safetensors", lora).read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) * 2 // 3])  # a copy that stopped inside a tensor
    return d / "truncated.safetensors"


def _flow_rank_mismatch(family, lora, d: Path) -> Path:
    """One module's lora_B at rank 8 beside its rank-4 lora_A (a file assembled from two runs)."""
    t, meta = _flow_tensors(lora)
    _, module, hidden = FAULT_MODULES[family]
    t[f"{module}.lora_B.weight"] = Tensor.from_numpy(np.full((hidden, 8), 0.01, np.float32), "F16")
    return _write(d, "rank_mismatch.safetensors", t, meta)


def _flow_untrained(family, lora, d: Path) -> Path:
    """Saved before the first step: PEFT initialises every lora_B to zero."""
    t, meta = _flow_tensors(lora)
    t = {k: Tensor.from_numpy(np.zeros(v.shape, np.float32), "F16") if ".lora_B." in k else v for k, v in t.items()}
    return _write(d, "untrained.safetensors", t, meta)


#: fault -> (maker, the named test that must fail, words its message must hold: {family} / {extra} / {ranked})
FLOW_FAULTS = {
    "module_that_does_not_exist": (_flow_module_that_does_not_exist, "test_every_key_maps", "{extra}.lora_A.weight"),
    "truncated_inside_a_tensor": (_flow_truncated, "test_file_parses", "truncated"),
    "rank_mismatch_between_a_and_b": (_flow_rank_mismatch, "test_tensors_fit_the_layout", "{ranked}.lora_B.weight"),
    "lora_b_all_zero": (_flow_untrained, "test_lora_b_is_trained", "every lora_B is all zeros"),
}


@conversion
@pytest.mark.parametrize("fault,family", [(f, "sd3") for f in FLOW_FAULTS]
                         # Flux: the faults found before diffusers is loaded (the untrained file costs a full run)
                         + [(f, "flux") for f in FLOW_FAULTS if f != "lora_b_all_zero"])
def test_a_faulty_flow_file_fails_the_named_test_about_it(tmp_path, fault, family):
    """Faults the conversion layer must catch without a base, in an SD3 / Flux PEFT file: exactly the named test
    about each fails, naming the file and the key where there is one; what could not run says why, naming that
    test (or, for a check the family has not, the family).  (A q/k swap inside one block is shape-compatible and
    needs a base: tests/test_flow_compare.py.)"""
    make, culprit, words = FLOW_FAULTS[fault]
    extra, ranked, _ = FAULT_MODULES[family]
    words = words.format(extra=extra, ranked=ranked)
    path = make(family, flow_lora(family, seed=13), tmp_path)
    proc, outcomes, _ = run_pytest(tmp_path, "--pyargs", "lora_parity", "-m", "conversion", "--lora-ckpt", str(path))
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = {n: m for n, (o, m) in outcomes.items() if o in ("failed", "error")}
    assert list(failed) == [culprit], f"failed: {sorted(failed)}\n{proc.stdout[-3000:]}"
    assert words in failed[culprit], failed[culprit]
    assert str(path) in failed[culprit] or culprit == "test_lora_b_is_trained", failed[culprit]
    for name, (outcome, message) in outcomes.items():
        if outcome == "skipped":
            assert culprit in message or FLOW_NOT_APPLICABLE[family].get(name, "?") in message, (name, message)


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
    """No ``pip install`` (or autoload off): the repository's conftest.py registers the plugin itself (the
    plugins whose options pytest.ini's addopts names, pytest-benchmark and pytest-xdist, are named with -p)."""
    proc, _, _ = run_pytest(tmp_path, "-p", "pytest_benchmark.plugin", "-p", "xdist.plugin", "--co", "-q",
                            "-m", "conversion", "--tol-f32", "1e-3", "tests/test_keymap.py", cwd=ROOT,
                            env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "test_keymap.py::" in proc.stdout


# ---------------------------------------------------------------- with a base model


TRAINER_SCRIPT = ROOT / "tests" / "mindone_scripts" / "save_trained_flow_lora.py"


@pytest.mark.parity
@pytest.mark.image
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_mindone_trained_flow_lora_with_a_base_runs_every_layer(tmp_path, family):
    """A LoRA saved by mindone.diffusers' own trainer code (``add_adapter`` with the SD3 / Flux trainer's default
    targets and on CLIP, ``save_lora_weights``: tests/mindone_scripts/save_trained_flow_lora.py) on
    ``random:tiny-sd3`` / ``random:tiny-flux``, checked with ``--lora-layout tiny-... --base random:tiny-...`` in
    one run: every conversion check that exists for the family passes (the others are skipped naming it) and the
    parity/image test runs compare on mindone.diffusers and passes, Flux at fp16 (mindone's attention precision:
    the JUnit ``dtype`` property); ``--ms-backend port`` says by family why it cannot."""
    from lora_parity.backends import get_backend
    from lora_parity.bases import resolve_base

    be = get_backend("mindone")
    ok, why = be.is_available()
    if not ok:  # CI (LORA_PARITY_NO_SKIPS) turns this skip into a failure: there the backend must be present
        pytest.skip(f"--ms-backend mindone: {why}")
    cache = tmp_path / "cache"
    base = resolve_base(f"random:tiny-{family}", cache=cache)
    made = subprocess.run([be.interpreter(), str(TRAINER_SCRIPT), family, str(base.pipeline_dir), str(tmp_path / "lora"),
                           "4", base.variant or ""], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    args = ["--pyargs", "lora_parity", "-m", "conversion or parity or image", "--lora-ckpt", str(path),
            "--lora-layout", f"tiny-{family}", "--base", f"random:tiny-{family}"]
    env = {"LORA_PARITY_CACHE": str(cache)}
    props: dict = {}
    proc, outcomes, _ = run_pytest(tmp_path, *args, env=env, props=props)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    na = FLOW_NOT_APPLICABLE[family]
    for name in (*NAMED, "test_parity_and_image_on_your_base"):
        outcome, message = outcomes[name]
        assert outcome == ("skipped" if name in na else "passed"), (name, outcome, message)
    assert props["test_layout_detected"]["family"] == family
    assert props["test_parity_and_image_on_your_base"]["dtype"] == {"sd3": "F32", "flux": "F16"}[family]
    proc, outcomes, _ = run_pytest(tmp_path, *args[:3], "parity or image", *args[4:], "--ms-backend", "port", env=env)
    outcome, message = outcomes["test_parity_and_image_on_your_base"]
    assert outcome == "skipped" and f"your LoRA is for {family}: the port runs SDXL only" in message, outcomes


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
