"""SD3 and Flux through ``compare``: mindone.diffusers against diffusers (issue 15, the transformer families).

The LoRA is what mindone.diffusers' trainers save (``add_adapter`` on the transformer with the trainer's default
targets and on the CLIP text encoders, ``save_lora_weights``; run in the mindone environment by
tests/mindone_scripts/save_trained_flow_lora.py); the bases are generated (``random:tiny-sd3``: CLIP-L, CLIP-G,
T5, MMDiT; ``random:tiny-flux``: CLIP-L, T5, double and single blocks, guidance embedding; FlowMatch Euler).

* SD3, fp32: a clean run passes with every row (text encoders incl. T5, conditioning, the transformer per
  denoising step replayed, the LoRA's effect, the VAE, a 2-step image).
* Flux: mindone computes Flux's attention in float16 (FlashAttentionScore on float16-cast inputs), so an fp32
  comparison is refused (exit 2, the reason named); judged anyway it fails at the first double block; at fp16
  it passes.
* Faults on the PyTorch side, each exit 1 naming where: q/k swapped in one joint / double block; the text
  encoder's LoRA dropped; every LoRA 1% too strong (caught in the text encoder, the first place it acts).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.convert.tensor import Tensor

from .helpers import run_cli

pytestmark = pytest.mark.parity
SCRIPT = Path(__file__).parent / "mindone_scripts" / "save_trained_flow_lora.py"
# the run each family passes at: SD3 fp32; Flux fp16 (mindone's attention precision, see the module docstring)
PASSING = {"sd3": ("--dtype", "fp32"), "flux": ("--dtype", "fp16")}
# fp32 judged anyway: the text encoders (no float16 attention there) are still held to fp32 rows
FP32_ANYWAY = {"sd3": (), "flux": ("--allow-env-drift",)}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(request, tmp_path_factory):
    """(family, base spec, cache, pipeline folder, the LoRA mindone's trainer code saved)."""
    from lora_parity.backends import get_backend
    from lora_parity.bases import resolve_base

    be = get_backend("mindone")
    ok, why = be.is_available()
    if not ok:
        pytest.skip(f"mindone backend: {why}")
    family = request.param
    root = tmp_path_factory.mktemp(family)
    spec, cache = f"random:tiny-{family}", root / "cache"
    base = resolve_base(spec, cache=cache)
    proc = subprocess.run([be.interpreter(), str(SCRIPT), family, str(base.pipeline_dir), str(root / "lora"), "4",
                           base.variant or ""], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return family, spec, cache, base.pipeline_dir, root / "lora" / "pytorch_lora_weights.safetensors"


def _compare(flow, tmp_path, *extra, backend="mindone"):
    _, spec, cache, _, lora = flow
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", "--ms-backend", backend, "--base", spec, "--cache", str(cache),
                              "--ms-lora", str(lora), "--report", str(report), "--quiet", *extra])
    data = json.loads((report / "report.json").read_text()) if (report / "report.json").is_file() else None
    return code, out + err, data


def _pt_side(flow, tmp_path, change) -> Path:
    """The trainer's file with ``change(tensors)`` applied, as the PyTorch side's LoRA."""
    tensors, meta = read_safetensors(flow[4])
    out = tmp_path / "pt_side.safetensors"
    write_safetensors(out, change(dict(tensors)), meta)
    return out


def test_mindone_trained_lora_passes(flow, tmp_path):
    family = flow[0]
    code, text, report = _compare(flow, tmp_path, "--steps", "2", *PASSING[family])
    assert code == 0, text[-3000:]
    comps = {r["component"] for r in report["layers"]}
    te = {"sd3": {"text_encoder", "text_encoder_2", "text_encoder_3"}, "flux": {"text_encoder", "text_encoder_2"}}
    assert te[family] | {"conditioning", "transformer", "vae"} <= comps
    kinds = {(r["component"], r["kind"]) for r in report["layers"]}
    assert {("transformer", "local"), ("transformer", "effect"), ("text_encoder", "effect")} <= kinds
    steps = {r["diffusers"].partition("#")[2] for r in report["layers"] if r["component"] == "transformer"}
    assert steps == {"", "1"}  # both denoising steps compared
    assert report["image"]["passed"]


@pytest.mark.parametrize("flow", ["flux"], indirect=True)  # SD3's attention on mindone is float32 on CPU
def test_flux_fp32_is_refused_for_mindones_float16_attention(flow, tmp_path):
    code, text, _ = _compare(flow, tmp_path)
    assert code == 2, text[-3000:]
    assert "FlashAttentionScore on float16-cast inputs" in text and "--dtype fp16" in text
    assert "Traceback" not in text
    code, text, report = _compare(flow, tmp_path, "--allow-env-drift")
    assert code == 1, text[-3000:]
    first = report["first_diverging_layer"]
    assert first["diffusers"] == "transformer.transformer_blocks.0", first
    assert "[F32, local]" in text  # the block's own (replayed) error, not an inherited one
    assert report["meta"]["env_drift_allowed"]


def test_qk_swap_in_one_block_fails_naming_it(flow, tmp_path):
    block = "transformer.transformer_blocks.0.attn." if flow[0] == "flux" else "transformer.transformer_blocks.1.attn."

    def swap(t):
        for half in ("lora_A", "lora_B"):
            q, k = f"{block}to_q.{half}.weight", f"{block}to_k.{half}.weight"
            t[q], t[k] = t[k], t[q]
        return t

    code, text, report = _compare(flow, tmp_path, "--pt-lora", str(_pt_side(flow, tmp_path, swap)),
                                  *PASSING[flow[0]])
    assert code == 1, text[-3000:]
    first = report["first_diverging_layer"]
    assert first["diffusers"].startswith(block.rsplit(".attn.", 1)[0]), first
    assert block.rsplit(".attn.", 1)[0] in text


def test_dropped_text_encoder_lora_fails_naming_the_text_encoder(flow, tmp_path):
    bad = _pt_side(flow, tmp_path, lambda t: {k: v for k, v in t.items() if not k.startswith("text_encoder.")})
    code, text, report = _compare(flow, tmp_path, "--pt-lora", str(bad), *FP32_ANYWAY[flow[0]])
    assert code == 1, text[-3000:]
    assert report["first_diverging_layer"]["component"] == "text_encoder", report["first_diverging_layer"]


def test_wrong_scale_fails(flow, tmp_path):
    def stronger(t):  # every LoRA 1% stronger: lora_B scaled
        return {k: Tensor.from_numpy(np.asarray(v.to_float("float32")) * np.float32(1.01)) if ".lora_B." in k else v
                for k, v in t.items()}

    code, text, report = _compare(flow, tmp_path, "--pt-lora", str(_pt_side(flow, tmp_path, stronger)),
                                  *FP32_ANYWAY[flow[0]])
    assert code == 1, text[-3000:]
    assert report["first_diverging_layer"]["component"] == "text_encoder", report["first_diverging_layer"]


def test_the_port_refuses_a_transformer_base_in_one_line(flow, tmp_path):
    code, text, _ = _compare(flow, tmp_path, backend="port")
    assert code == 2 and flow[0] in text and "Traceback" not in text, text[-2000:]


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)  # Flux's fp32 bundles are refused like its fp32 compare
def test_bundles_captured_apart_are_judged_alike(flow, tmp_path):
    _, spec, cache, _, lora = flow
    common = ["--base", spec, "--cache", str(cache), "--lora", str(lora), "--steps", "2", "--quiet"]
    pt, ms = tmp_path / "pt", tmp_path / "ms"
    code, out, err = run_cli(["capture", "--backend", "diffusers", *common, "-o", str(pt)])
    assert code == 0, (out + err)[-2000:]
    code, out, err = run_cli(["capture", "--backend", "mindone", *common, "--replay-from", str(pt), "-o", str(ms)])
    assert code == 0, (out + err)[-2000:]
    code, out, err = run_cli(["compare", "--ms-bundle", str(ms), "--pt-bundle", str(pt), "--report",
                              str(tmp_path / "report")])
    assert code == 0, (out + err)[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["meta"]["judged"]["replayed"] and report["image"]["passed"]


def test_intermediate_training_checkpoint_gives_the_trainers_own_transformer_lora(flow, tmp_path):
    """``checkpoint-N/pytorch_model.ckpt`` (the whole PEFT-wrapped transformer, saved by MindSpore mid-run):
    the LoRA extracted from it equals the transformer part of the trainer's final file, tensor for tensor."""
    from lora_parity.convert.converter import ConvertOptions, convert

    family, _, _, pipe_dir, lora = flow
    out = tmp_path / "extracted.safetensors"
    report = convert(ConvertOptions(src=lora.parent / "checkpoint-100" / "pytorch_model.ckpt", dst=out,
                                    layout=str(pipe_dir)))
    assert report.dst_format == "peft" and any("PEFT-wrapped transformer" in n for n in report.notes)
    ours, _ = read_safetensors(out)
    theirs = {k: v for k, v in read_safetensors(lora)[0].items() if k.startswith("transformer.")}
    assert ours and set(ours) == set(theirs) and all(ours[k].bitwise_equal(theirs[k]) for k in ours)


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)
def test_a_pt_side_fault_reuses_the_kept_mindone_capture(flow, tmp_path):
    """A fault on the PyTorch side re-runs that side and only the replay of the kept MindSpore capture (its
    chained outputs do not depend on PyTorch's): still named at its block, every denoising step replayed."""
    from lora_parity.compare import CompareOptions, run_compare

    _, spec, cache, _, lora = flow
    common = dict(base=spec, cache=cache, ms_backend="mindone", steps=2, ms_lora=lora)
    assert run_compare(CompareOptions(keep_captures=tmp_path / "kept", **common)).passed

    def swap(t):
        block = "transformer.transformer_blocks.1.attn."
        for half in ("lora_A", "lora_B"):
            q, k = f"{block}to_q.{half}.weight", f"{block}to_k.{half}.weight"
            t[q], t[k] = t[k], t[q]
        return t

    report = run_compare(CompareOptions(pt_lora=_pt_side(flow, tmp_path, swap),
                                        reuse_captures={"ms": tmp_path / "kept" / "ms"}, **common)).to_dict()
    assert not report["passed"]
    assert report["first_diverging_layer"]["diffusers"] == "transformer.transformer_blocks.1"
    replayed = {r["diffusers"] for r in report["layers"] if r["kind"] == "local" and r["component"] == "transformer"}
    assert "transformer.transformer_blocks.1#1" in replayed  # the second step replayed too
