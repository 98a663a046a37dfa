"""The parity layer: every aligned layer of both text encoders, the UNet and the VAE decoder,
MindSpore vs PyTorch, on fixed inputs — and proof that realistic faults make it fail."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import ckpt_io, formats
from lora_parity.compare import CompareOptions, run_compare
from lora_parity.convert.converter import load_lora
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.parity.metrics import assert_report
from lora_parity.convert.safetensors_io import write_safetensors
from lora_parity.convert.tensor import Tensor
from lora_parity.parity.tolerances import FAULT_FACTOR, layer_tolerance

from . import faults
from .helpers import run_cli

pytestmark = pytest.mark.parity

TE2 = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    pytest.importorskip("mindspore")
    from lora_parity.fixtures.bundle import write_fixture

    return write_fixture(tmp_path_factory.mktemp("parity") / "fx")


@pytest.fixture
def tol_overrides(request):
    """The layer-gate options (--tol-<dtype>, --mismatch-<dtype>) as CompareOptions fields."""
    from conftest import gate_overrides

    got = gate_overrides(request.config)
    return {k: got[k] for k in ("tol_overrides", "mismatch_overrides", "rms_overrides")}


def _opts(fx, **kw) -> CompareOptions:
    base = dict(pt_base=fx.pt_base, ms_base=fx.ms_base, latents=fx.latents)
    base.update(kw)
    return CompareOptions(**base)


def _diffusers_name(fx, sgm: str) -> str:
    """The diffusers module a port (SGM) layer is aligned with: the name both backends' reports share."""
    from lora_parity.compare import alignment_for

    return {a.sgm: a.diffusers for a in alignment_for(fx.pt_base, [500.0], "sgm")}[sgm]


def test_base_models_agree_layer_by_layer(fx, ms_backend, record_property, tol_overrides):
    report = run_compare(_opts(fx, ms_backend=ms_backend, **tol_overrides))
    assert report.meta["backend"] == ms_backend
    components = {m.component for m in report.layers}
    assert components == {"text_encoder", "text_encoder_2", "conditioning", "unet", "vae"}
    # every component judged twice: chained (the whole run) and local (each block replayed on PyTorch's inputs)
    assert {(m.component, m.kind) for m in report.layers} >= {(c, k) for c in components for k in ("local", "chained")}
    assert not [m for m in report.layers if m.kind == "effect"]  # no LoRA, no effect to judge
    assert_report(report, record_property)


def test_lora_models_agree_layer_by_layer(fx, ms_backend, record_property, tol_overrides, tmp_path):
    report = run_compare(_opts(fx, ms_lora=fx.ms_lora, report_dir=tmp_path, ms_backend=ms_backend, **tol_overrides))
    assert_report(report, record_property)
    assert (tmp_path / "report.json").is_file()
    record_property("unet_first_forward_seconds", report.meta["unet_first_forward_seconds"])


def test_lora_on_vs_off_differs_far_beyond_tolerance(fx, ms_backend, tmp_path):
    """Proves the LoRA is applied: MS with LoRA vs PT without it fails every LoRA'd layer by far."""
    empty = tmp_path / "no_lora.safetensors"
    lora = load_lora(fx.ms_lora, layout=layout_from_pipeline_dir(fx.pt_base))
    one = next(iter(lora.pairs.values()))  # a PEFT file that changes nothing: lora_B = 0
    zero = formats.tensors_for(type(lora)({one.module.sgm: type(one)(one.module, one.A, Tensor.from_numpy(
        np.zeros(one.B.shape, np.float32)), one.alpha)}, lora.layout, "", "ms"), "peft")
    write_safetensors(empty, *zero)
    report = run_compare(_opts(fx, ms_lora=fx.ms_lora, pt_lora=empty, ms_backend=ms_backend))
    tol = layer_tolerance("F32", backend=ms_backend).rel
    from lora_parity.compare import alignment_for

    no_lora = {a.diffusers for a in alignment_for(fx.pt_base, [500.0], "sgm")
               if a.sgm.endswith(("input_blocks.0", "embeddings", "token_embedding"))}  # before any LoRA'd module
    lora_layers = [m for m in report.layers if m.component in ("unet", "text_encoder", "text_encoder_2")
                   and m.diffusers not in no_lora and m.kind == "chained"]
    assert lora_layers
    weak = [m.message() for m in lora_layers if m.rel_err < FAULT_FACTOR * max(tol, m.tol_rel)]
    assert not weak, weak[:3]
    # the LoRA's effect: every block the MindONE file targets changes nothing on the PyTorch side
    noop = [m for m in report.layers if m.kind == "effect" and "noop" in m.failed]
    assert noop and all("PyTorch side" in m.message() for m in noop), [m.message() for m in noop[:2]]


def _faulty_pt_lora(fx, tmp_path, fault) -> Path:
    lora = load_lora(fx.ms_lora, layout=layout_from_pipeline_dir(fx.pt_base))
    out = tmp_path / "faulty_pt.safetensors"
    write_safetensors(out, *formats.tensors_for(fault(lora), "peft"))
    return out


@pytest.mark.parametrize("fault,first_layer", [
    (lambda l: faults.swap_projections(l, "input_blocks.3"), "model.diffusion_model.input_blocks.3"),
    (faults.wrong_scale, "conditioner.embedders.0.transformer.text_model.encoder.layers.0"),
    (lambda l: faults.drop_block(l, "input_blocks.3"), "model.diffusion_model.input_blocks.3"),
], ids=["swapped_projections", "wrong_scale", "block_left_out"])
def test_lora_faults_fail_and_name_first_layer(fx, ms_backend, tmp_path, fault, first_layer):
    report = run_compare(_opts(fx, ms_lora=fx.ms_lora, pt_lora=_faulty_pt_lora(fx, tmp_path, fault),
                               ms_backend=ms_backend))
    assert not report.passed
    assert report.first_failure.diffusers == _diffusers_name(fx, first_layer), report.first_failure.message()


def _faulty_base(fx, tmp_path, fault) -> Path:
    sgm = {k: t.to_float("float32") for k, t in ckpt_io.read_ckpt(fx.ms_base).items()}
    out = tmp_path / "faulty_base.ckpt"
    ckpt_io.write_ckpt(out, {k: Tensor.from_numpy(np.ascontiguousarray(v)) for k, v in fault(sgm).items()})
    return out


@pytest.mark.parametrize("fault,first_layer", [
    (lambda sd: faults.untransposed_text_projection(sd, TE2), TE2 + "text_projection"),
    (lambda sd: faults.qkv_wrong_order(sd, TE2), TE2 + "transformer.resblocks.0"),
], ids=["text_projection_not_transposed", "qkv_split_wrong_order"])
def test_base_weight_faults_fail_and_name_first_layer(fx, tmp_path, fault, first_layer):
    report = run_compare(_opts(fx, ms_base=_faulty_base(fx, tmp_path, fault)))
    assert not report.passed
    assert report.first_failure.sgm == first_layer, report.first_failure.message()


def test_compare_command_exit_codes(fx, tmp_path):
    bad = _faulty_base(fx, tmp_path, lambda sd: faults.qkv_wrong_order(sd, TE2))
    code, out, err = run_cli(["compare", "--pt-base", str(fx.pt_base), "--ms-base", str(bad),
                              "--latents", str(fx.latents), "--report", str(tmp_path / "rep")])
    assert code == 1, err
    assert "first diverging layer" in out and TE2 + "transformer.resblocks.0" in out
    assert (tmp_path / "rep" / "report.json").is_file()
    code, _, err = run_cli(["compare", "--pt-base", str(tmp_path), "--ms-base", str(bad)])
    assert code == 2 and "model_index.json" in err


LOW_PRECISION = ["F16", "BF16"]


def _skip_unsupported(dtype):
    from lora_parity.backends.port.view import MindSporeBackend

    ok, why = MindSporeBackend.supports(dtype)
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_within_budget_of_fp32_reference(fx, dtype, record_property, tol_overrides):
    _skip_unsupported(dtype)
    report = run_compare(_opts(fx, ms_lora=fx.ms_lora, dtype=dtype, **tol_overrides))
    # every layer's budget comes from PyTorch's own low-precision run; chained errors are never exactly 0,
    # a replayed block can be (the size/crop sinusoid is computed in fp32 by diffusers in every dtype)
    assert all(m.ref_rel_err is not None for m in report.layers if m.depth > 0)
    assert all(m.ref_rel_err > 0 for m in report.layers if m.depth > 0 and m.kind == "chained")
    assert_report(report, record_property)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_still_catches_a_wrong_scale(fx, tmp_path, dtype):
    _skip_unsupported(dtype)
    report = run_compare(_opts(fx, ms_lora=fx.ms_lora, dtype=dtype,
                               pt_lora=_faulty_pt_lora(fx, tmp_path, faults.wrong_scale)))
    assert not report.passed


def test_merged_lora_agrees_too(fx, record_property):
    """MindSpore with the LoRA folded into the weights (merge option) matches diffusers as well."""
    assert_report(run_compare(_opts(fx, ms_lora=fx.ms_lora, merge=True)), record_property)


def _bad_latents(tmp_path, shape, name):
    path = tmp_path / name
    np.save(path, np.zeros(shape, np.float32))
    return str(path)


@pytest.mark.parametrize("case", ["latents_channels", "latents_size", "latents_nan", "lora_as_base",
                                  "base_as_lora", "missing_pipeline", "bf16_on_cpu"])
def test_compare_and_infer_bad_input_one_line(fx, tmp_path, case):
    base = ["--pt-base", str(fx.pt_base), "--ms-base", str(fx.ms_base)]
    if case == "latents_channels":
        argv = ["compare", *base, "--latents", _bad_latents(tmp_path, (1, 3, 16, 16), "c.npy")]
    elif case == "latents_size":
        argv = ["infer", "--backend", "pt", "--pt-base", str(fx.pt_base), "-o", str(tmp_path / "x.png"),
                "--latents", _bad_latents(tmp_path, (1, 4, 15, 16), "s.npy")]
    elif case == "latents_nan":
        path = tmp_path / "n.npy"
        np.save(path, np.full((1, 4, 16, 16), np.nan, np.float32))
        argv = ["compare", *base, "--latents", str(path)]
    elif case == "lora_as_base":
        argv = ["compare", "--pt-base", str(fx.pt_base), "--ms-base", str(fx.ms_lora)]
    elif case == "base_as_lora":
        argv = ["compare", *base, "--ms-lora", str(fx.ms_base)]
    elif case == "missing_pipeline":
        argv = ["compare", "--pt-base", str(tmp_path / "nope"), "--ms-base", str(fx.ms_base)]
    else:
        argv = ["compare", *base, "--dtype", "bf16"]
        from lora_parity.backends.port.view import MindSporeBackend

        if MindSporeBackend.supports("BF16")[0]:
            pytest.skip("this MindSpore device supports bf16")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(argv)
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-parity: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_compare_takes_the_ema_choice_on_both_sides(tmp_path):
    """compare with a MindONE file holding both sets: refused without a choice; with --ema / --no-ema both
    sides run the chosen set (a side that took the other set would fail the comparison)."""
    from lora_parity.convert.converter import ConvertOptions, convert
    from lora_parity.fixtures.bundle import write_fixture
    from lora_parity.fixtures.synthetic import make_lora

    fx = write_fixture(tmp_path / "fx")
    layout = layout_from_pipeline_dir(fx.pt_base)
    trained = make_lora(layout, rank=4, alpha=8.0, seed=21, b_std=0.1)
    averaged = make_lora(layout, rank=4, alpha=8.0, seed=22, b_std=0.1)
    both = dict(formats.tensors_for(trained, "ms")[0])
    both.update({f"ema.{k}": v for k, v in formats.tensors_for(averaged, "ms")[0].items()})
    src = tmp_path / "both_lora.ckpt"
    ckpt_io.write_ckpt(src, both)
    base = ["compare", "--pt-base", str(fx.pt_base), "--ms-base", str(fx.ms_base), "--latents", str(fx.latents),
            "--ms-lora", str(src), "--quiet"]
    code, _, err = run_cli(base)
    assert code == 2 and "--ema" in err and str(src) in err
    for flag in ("--ema", "--no-ema"):
        code, out, err = run_cli(base + [flag])
        assert code == 0, out + err[-2000:]
    # the choice reaches the MindSpore side too: PyTorch given the EMA set, MindSpore the trained one
    ema_peft = tmp_path / "ema.safetensors"
    convert(ConvertOptions(src=src, dst=ema_peft, fmt="peft", layout=str(fx.pt_base), ema=True))
    code, out, err = run_cli(base + ["--no-ema", "--pt-lora", str(ema_peft)])
    assert code == 1, out + err[-2000:]
