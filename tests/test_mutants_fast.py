"""A fast subset of the mutation catalogue (``scripts/mutants.py``, ``make mutants``) in ``make test``.

One fault or more per area -- key map, writer, weight map, LoRA injection, numerics, sampler, the
judge's alignment, the ``mindone`` backend -- run through the very code ``make mutants`` runs
(:class:`Runner`, whose clean captures are shared by the whole session, so each fault reruns only
the side it touches).  Each must be *caught* by a gate, not crash compare, and fail first at the
block that holds it -- a GroupNorm eps of 1e-6 for 1e-5 included, which only a block's local
(replayed) error, by its RMS, can see.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutants = sys.modules.get("lora_parity_mutants") or _load("lora_parity_mutants", ROOT / "scripts" / "mutants.py")

# area -> faults; the areas issue 14 asks for, plus the judge's alignment
FAST = {
    "key map": ["keymap_attn1_qk_swap"],
    "writer": ["writer_drops_te1_layer"],
    "weight map": ["up_attention_index_off_by_one"],
    "LoRA injection": ["lora_scale_inverted"],
    "numerics": ["self_attention_qk_swapped", "groupnorm_eps"],
    "sampler": ["cfg_wrong_branch"],
    "alignment": ["align_text_layer_off_by_one"],
    "mindone": ["mindone_unet_attn1_qk_swapped", "mindone_resnet_groupnorm_eps", "mindone_compat_gelu_tanh"],
}
# GroupNorm eps 1e-6 vs 1e-5 moves its block by a local 4.9e-6 (both backends): below the local UNet row
# (1e-5) as first calibrated; a flip to XPASS means the replay rows now see it -- then drop the mark
# faults below any chained row (a few 1e-6): caught by the local RMS bound only
SMALL_NUMERICS = {"groupnorm_eps", "mindone_resnet_groupnorm_eps"}


def pytest_generate_tests(metafunc):
    """``mutant``: the fast subset, on the MindSpore backends ``--ms-backend`` selects."""
    if "mutant" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--ms-backend")
        by_name = {m.name: m for m in mutants.CATALOGUE}
        params = [pytest.param(by_name[n], id=n)
                  for names in FAST.values() for n in names if chosen in ("all", by_name[n].backend)]
        metafunc.parametrize("mutant", params)


@pytest.fixture(scope="session")
def runner(tmp_path_factory):
    """One base, LoRA and clean run per backend for the session (made when a backend's first fault runs)."""
    pytest.importorskip("mindspore")
    return mutants.Runner(tmp_path_factory.mktemp("mutants"))


def _available(backend: str) -> None:
    from lora_parity.backends import get_backend

    ok, why = get_backend(backend).is_available()
    if not ok:  # CI's LORA_PARITY_NO_SKIPS turns this into a failure
        pytest.skip(f"--ms-backend {backend}: {why}")


def test_fault_is_caught_where_it_lives(runner, mutant):
    _available(mutant.backend)
    outcome = runner.run(mutant)
    line = mutants.format_line(1, 1, outcome)
    if outcome.verdict == mutants.CRASH:  # not an AssertionError: a strict xfail does not absorb it
        pytest.fail(f"the fault stopped compare instead of failing a gate: {line}")
    assert outcome.caught, line
    assert outcome.first == mutant.expect, f"expected {mutant.expect}: {line}"


def test_a_fault_that_stops_the_side_child_is_a_crash_not_a_catch(runner):
    """A plant that makes the MindSpore child exit with an error: compare raises, no gate judged anything."""
    fault = mutants.Mutant("plant_fails", "tests/child_faults", "the child exits at start", "-",
                           child="no_such_fault_in_the_catalogue")
    outcome = runner.run(fault)
    assert outcome.verdict == mutants.CRASH and not outcome.caught, mutants.format_line(1, 1, outcome)
    assert "compare stopped" in outcome.detail
    assert mutants.exit_status([outcome]) == 1


# ---------------------------------------------------------------- the catalogue itself (no compare runs)


@pytest.mark.conversion
def test_catalogue_covers_every_area_and_both_backends():
    names = [m.name for m in mutants.CATALOGUE]
    assert len(names) >= 40 and len(set(names)) == len(names)
    assert {m.backend for m in mutants.CATALOGUE} == {"port", "mindone"}
    assert {m.side for m in mutants.CATALOGUE} == {"parent", "ms"}
    assert {n for ns in FAST.values() for n in ns} <= set(names) and SMALL_NUMERICS <= set(names)
    for m in mutants.CATALOGUE:  # port judged by SGM names, mindone by diffusers names
        sgm = m.expect.startswith(("model.", "conditioner.", "first_stage_model."))
        assert m.expect == mutants.IMAGE or sgm == (m.backend == "port"), m
        assert not (m.plant and m.backend == "mindone"), f"{m.name}: mindone loads the converted file too"


@pytest.mark.conversion
def test_catalogue_names_real_child_faults():
    patches = _load("child_fault_patches", ROOT / "tests" / "child_faults" / "child_fault_patches.py")
    assert {m.child for m in mutants.CATALOGUE if m.child} <= set(patches.FAULTS)


@pytest.mark.conversion
def test_verdicts_and_exit_status():
    m = mutants.CATALOGUE[0]
    caught = mutants.Outcome(m, mutants.CAUGHT, m.expect, "", 1.0)
    elsewhere = mutants.Outcome(m, mutants.CAUGHT, "model.diffusion_model.out", "", 1.0)
    missed = mutants.Outcome(m, mutants.MISSED, None, "", 1.0)
    crash = mutants.Outcome(m, mutants.CRASH, None, "compare stopped: ...", 1.0)
    assert caught.as_expected and not elsewhere.as_expected and not crash.caught
    assert mutants.exit_status([caught, elsewhere]) == 0
    assert mutants.exit_status([caught, missed]) == mutants.exit_status([caught, crash]) == 1
    table = mutants.summary_table([caught, elsewhere, missed, crash])
    assert [ln.split()[3] for ln in table.splitlines()[2:]] == ["caught", "caught", "missed", "crash"]
    assert "2/4 caught (1 not at the expected layer), 1 missed, 1 crashed" in mutants.score_line(
        [caught, elsewhere, missed, crash])
