"""The ``mindone`` backend (mindone.diffusers in .venv-mindone) and capture bundles, through the CLI users run.

Every check here has a fault that makes it fail on the default path: a swapped q/k in the
PEFT file mindone loads, a folder mindone would silently initialise randomly, a LoRA tensor
mindone's loader does not place, bundles captured from other inputs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_parity.convert import formats
from lora_parity.convert.converter import load_lora
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors

from . import faults
from .helpers import run_cli

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    pytest.importorskip("mindspore")
    from lora_parity.fixtures.bundle import write_fixture

    return write_fixture(tmp_path_factory.mktemp("mindone") / "fx")


@pytest.fixture
def mindone(request):
    """The mindone backend must be able to run (skip otherwise; CI's LORA_PARITY_NO_SKIPS makes that a failure)."""
    from lora_parity.backends import get_backend

    ok, why = get_backend("mindone").is_available()
    if not ok:
        pytest.skip(f"mindone backend: {why}")
    return "mindone"


def _peft(fx, tmp_path, name, fault=None) -> Path:
    lora = load_lora(fx.ms_lora, layout=layout_from_pipeline_dir(fx.pt_base))
    out = tmp_path / name
    write_safetensors(out, *formats.tensors_for(fault(lora) if fault else lora, "peft"))
    return out


def _compare(fx, *extra):
    return run_cli(["compare", "--ms-backend", "mindone", "--pt-base", str(fx.pt_base), "--latents",
                    str(fx.latents), "--quiet", *extra])


def test_mindone_compare_passes_without_and_with_lora(fx, mindone, tmp_path):
    code, out, err = _compare(fx)
    assert code == 0, out + err[-2000:]
    code, out, err = _compare(fx, "--ms-lora", str(fx.ms_lora), "--report", str(tmp_path))  # rank 4, alpha 8
    assert code == 0, out + err[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["backend"] == "mindone" and report["meta"]["tolerance"]["backend"] == "mindone"
    assert report["meta"]["versions"]["mindspore"]["mindone"] == "0.5.0"
    lora_layers = [m for m in report["layers"] if m["component"] == "unet"]
    assert lora_layers and all(m["passed"] for m in lora_layers)


def test_mindone_loads_a_peft_file_as_mindone_training_writes_it(fx, mindone, tmp_path):
    """--ms-lora may be a PEFT safetensors for mindone (both sides then load that one file)."""
    code, out, err = _compare(fx, "--ms-lora", str(_peft(fx, tmp_path, "lora.safetensors")))
    assert code == 0, out + err[-2000:]


def test_swapped_qk_in_the_peft_file_fails_with_exit_1(fx, mindone, tmp_path):
    good = _peft(fx, tmp_path, "good.safetensors")
    bad = _peft(fx, tmp_path, "swapped.safetensors", lambda l: faults.swap_projections(l, "input_blocks.3"))
    code, out, err = _compare(fx, "--ms-lora", str(bad), "--pt-lora", str(good))
    assert code == 1, out + err[-2000:]
    assert "first diverging layer" in out and "unet.down_blocks.1.attentions.0" in out, out


def test_mindone_refuses_a_folder_it_would_initialise_randomly(fx, mindone, tmp_path):
    """transformers 5 writes CLIP-L without ``text_model.``: mindone.transformers would only warn and
    initialise it randomly. Here it is a one-line error naming the folder and a weight."""
    base = tmp_path / "flat_base"
    shutil.copytree(fx.pt_base, base)
    f = base / "text_encoder" / "model.safetensors"
    tensors, meta = read_safetensors(f)
    write_safetensors(f, {k.removeprefix("text_model."): v for k, v in tensors.items()}, meta)
    code, out, err = run_cli(["compare", "--ms-backend", "mindone", "--pt-base", str(base), "--quiet"])
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-parity: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "text_encoder" in lines[0] and ("missing" in lines[0] or "not used" in lines[0]), lines[0]


def test_a_lora_tensor_mindone_does_not_place_is_an_error(fx, mindone, tmp_path):
    good = _peft(fx, tmp_path, "good.safetensors")
    tensors, meta = read_safetensors(good)
    key = next(k for k in tensors if k.startswith("unet.") and ".to_q.lora_A." in k)
    stray = key.replace(".to_q.", ".to_qq.")
    bad = tmp_path / "stray.safetensors"
    write_safetensors(bad, {**tensors, stray: tensors[key]}, meta)
    code, out, err = _compare(fx, "--ms-lora", str(bad), "--pt-lora", str(good))
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-parity: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "to_qq" in lines[0] and str(bad) in lines[0], lines[0]


def test_mindone_backend_that_cannot_run_is_one_error(fx, tmp_path):
    code, out, err = _compare(fx, "--ms-python", str(tmp_path / "no" / "python"))
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-parity: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "mindone" in lines[0] and str(tmp_path / "no" / "python") in lines[0]


# ---------------------------------------------------------------- bundles


def _capture(fx, backend, out, *extra):
    argv = ["capture", "--backend", backend, "--pt-base", str(fx.pt_base), "--latents", str(fx.latents),
            "--quiet", "-o", str(out), *extra]
    if backend == "port":
        argv += ["--ms-base", str(fx.ms_base)]
    code, stdout, err = run_cli(argv)
    assert code == 0, stdout + err[-2000:]
    return out


def _layers(report_dir: Path) -> dict:
    rep = json.loads((report_dir / "report.json").read_text())
    return {(m["kind"], m["diffusers"]): (m["rel_err"], m["mismatch_fraction"], m["passed"])
            for m in rep["layers"]}, rep


@pytest.mark.parametrize("lora", ["good", "swapped"])
def test_bundles_judged_elsewhere_give_the_one_shot_verdict(fx, ms_backend, tmp_path, lora):
    """capture (one command per backend, as on two machines; the MindSpore one replays the diffusers bundle's
    outputs) + compare --ms-bundle/--pt-bundle equals the one-shot compare layer by layer -- local, chained and
    the LoRA's effect -- for a passing and for a failing LoRA."""
    ms_lora = fx.ms_lora
    extra = []
    if lora == "swapped":  # the MindSpore side loads a faulty file, diffusers the right one
        if ms_backend == "port":
            from lora_parity.convert.ckpt_io import write_ckpt

            ms_lora = tmp_path / "swapped.ckpt"
            bad = faults.swap_projections(load_lora(fx.ms_lora, layout=layout_from_pipeline_dir(fx.pt_base)),
                                          "input_blocks.3")
            write_ckpt(ms_lora, formats.tensors_for(bad, "ms")[0])
        else:
            ms_lora = _peft(fx, tmp_path, "swapped.safetensors",
                            lambda l: faults.swap_projections(l, "input_blocks.3"))
        extra = ["--pt-lora", str(_peft(fx, tmp_path, "good.safetensors"))]
    pt_lora = extra[1] if extra else str(fx.ms_lora)
    pt_b = _capture(fx, "diffusers", tmp_path / "pt_bundle", "--lora", pt_lora, "--steps", "2")
    ms_b = _capture(fx, ms_backend, tmp_path / "ms_bundle", "--lora", str(ms_lora), "--steps", "2",
                    "--replay-from", str(pt_b))
    code_b, out_b, err_b = run_cli(["compare", "--ms-bundle", str(ms_b), "--pt-bundle", str(pt_b), "--report",
                                    str(tmp_path / "rep_b")])
    argv = ["compare", "--ms-backend", ms_backend, "--pt-base", str(fx.pt_base), "--latents", str(fx.latents),
            "--ms-lora", str(ms_lora), "--steps", "2", "--quiet", "--report", str(tmp_path / "rep_1"), *extra]
    if ms_backend == "port":
        argv += ["--ms-base", str(fx.ms_base)]
    code_1, out_1, err_1 = run_cli(argv)
    assert code_b == code_1 == (0 if lora == "good" else 1), (out_b + err_b[-1500:], out_1 + err_1[-1500:])
    layers_b, rep_b = _layers(tmp_path / "rep_b")
    layers_1, rep_1 = _layers(tmp_path / "rep_1")
    assert layers_b == layers_1
    assert {kind for kind, _ in layers_b} == {"local", "chained", "effect"}
    assert rep_b["image"]["mae"] == rep_1["image"]["mae"]
    assert rep_b["meta"]["backend"] == ms_backend and rep_b["meta"]["bundles"]


def test_bundles_from_different_inputs_are_refused(fx, tmp_path):
    ms_b = _capture(fx, "port", tmp_path / "ms_bundle")
    pt_b = _capture(fx, "diffusers", tmp_path / "pt_bundle", "--prompt", "another prompt")
    code, out, err = run_cli(["compare", "--ms-bundle", str(ms_b), "--pt-bundle", str(pt_b)])
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-parity: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "different inputs" in lines[0] and "prompt" in lines[0] and "token ids" in lines[0], lines[0]
    # the sides the wrong way round, and an existing output without --force
    code, _, err = run_cli(["compare", "--ms-bundle", str(pt_b), "--pt-bundle", str(ms_b)])
    assert code == 2 and "not a MindSpore one" in err
    code, _, err = run_cli(["capture", "--backend", "diffusers", "--pt-base", str(fx.pt_base), "-o", str(pt_b)])
    assert code == 2 and "--force" in err


def test_bundle_holds_inputs_versions_and_measurements(fx, tmp_path):
    b = _capture(fx, "diffusers", tmp_path / "pt_bundle", "--lora", str(fx.ms_lora))
    from lora_parity.sides.bundle import read_bundle

    got = read_bundle(b)
    assert got.manifest["backend"] == "diffusers" and got.manifest["naming"] == "diffusers"
    assert got.manifest["lora_sha256"] and got.manifest["versions"]["torch"]
    assert got.manifest["peak_rss_bytes"] > 0 and got.manifest["seconds"]["total"] > 0
    assert "_inputs.input_ids" in got.result.acts and "latents" in got.request.arrays
    assert (b / "configs" / "unet" / "config.json").is_file()
    assert not list(b.rglob("*.pkl")) and not list(b.rglob("*.pt"))
