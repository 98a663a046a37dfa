"""What the tool writes is readable by others: strict JSON, kohya files sd-scripts can use, quiet stderr.

* report.json must parse with a strict JSON parser (identical images have an infinite PSNR,
  which Python would write as the non-JSON token ``Infinity``), and no JSON writer in the
  package may ever emit ``NaN``/``Infinity``.
* kohya ``.alpha`` is a 0-d tensor in the LoRA's dtype, because sd-scripts' LoRAModule does
  ``alpha.detach().float().numpy() / rank``: a shape-[1] alpha turns that scale into an array,
  which upcasts an fp16 forward to float32 and raises in bf16.
* ``fixture`` / ``compare`` / ``infer`` / ``demo`` print no transformers import warnings or
  weight-loading bars, and a pipeline folder with a missing text-encoder weight is a one-line
  error (exit 2), not a warning followed by a randomly initialised layer.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import converter as convert_mod
from lora_parity.convert import formats
from lora_parity.parity.image_metrics import image_metrics
from lora_parity.parity.metrics import ParityReport
from lora_parity.parity.report import dumps_strict, strict_jsonable, write_report
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.fixtures.synthetic import make_lora
from lora_parity.convert.tensor import Tensor
from lora_parity.convert.layout import tiny_layout

PACKAGE = Path(__file__).resolve().parents[1] / "lora_parity"
REPO = PACKAGE.parent


def _reject_constant(token: str):
    raise ValueError(f"non-JSON constant {token!r}")


def strict_loads(text: str):
    """json.loads that fails on NaN / Infinity / -Infinity, as RFC 8259 parsers do."""
    return json.loads(text, parse_constant=_reject_constant)


# ---------------------------------------------------------------- strict JSON


@pytest.mark.conversion
def test_report_json_is_strict_when_images_are_identical(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    m = image_metrics(img, img)
    assert m.psnr == float("inf")  # the case that used to be written as `Infinity`
    report = ParityReport(image={**m.to_dict(), "passed": True}, meta={"odd": [1.0, float("nan")]})
    paths = write_report(tmp_path, report, images={"ms": img, "pt": img})
    data = strict_loads(paths["json"].read_text())
    assert data["image"]["psnr"] is None and data["image"]["psnr_infinite"] is True
    assert data["image"]["mae"] == 0.0
    assert data["meta"]["odd"] == [1.0, None] and data["meta"]["odd_nonfinite"] == {"1": "nan"}


@pytest.mark.conversion
def test_strict_jsonable_flags_every_non_finite_number():
    data = {"a": float("-inf"), "b": np.float32("nan"), "c": {"d": np.array([1.0, np.inf])},
            "e": np.int64(3), "f": (1, 2), "g": Path("x")}
    out = strict_jsonable(data)
    assert out == {"a": None, "a_neg_infinite": True, "b": None, "b_nan": True,
                   "c": {"d": [1.0, None], "d_nonfinite": {"1": "inf"}}, "e": 3, "f": [1, 2], "g": "x"}
    strict_loads(dumps_strict(data))


def _json_dump_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("dump", "dumps") and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "json"):
            yield node


@pytest.mark.conversion
def test_every_json_writer_in_the_package_is_strict():
    """Static: each json.dump(s) call passes allow_nan=False (so a NaN raises instead of being written)."""
    loose, seen = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in _json_dump_calls(ast.parse(path.read_text(), str(path))):
            seen += 1
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("allow_nan"), ast.Constant) and kw["allow_nan"].value is False):
                loose.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert seen, "no json.dump(s) call found: the scan is broken"
    assert not loose, f"json.dump(s) without allow_nan=False: {loose}"


# ---------------------------------------------------------------- kohya alpha

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _kohya_file(tmp_path: Path, dtype: str, alpha: float = 3.0) -> Path:
    path = tmp_path / f"kohya_{dtype}.safetensors"
    formats.write(path, make_lora(tiny_layout(), rank=2, alpha=alpha, dtype=dtype), "kohya")
    return path


def sd_scripts_scale(alpha_tensor, rank: int):
    """What sd-scripts' ``LoRAModule.__init__`` does with a loaded ``.alpha`` (networks/lora.py).

    ``create_network_from_weights`` passes ``weights_sd[name + '.alpha']`` as ``alpha``; the
    module keeps ``alpha / lora_dim`` as ``self.scale`` and ``torch.tensor(alpha)`` as a buffer.
    """
    import torch

    alpha = alpha_tensor
    if type(alpha) == torch.Tensor:  # noqa: E721 - sd-scripts' own test
        alpha = alpha.detach().float().numpy()
    alpha = rank if alpha is None or alpha == 0 else alpha
    return alpha / rank, torch.tensor(alpha)


def sd_scripts_forward(x, down, up, scale, multiplier: float = 1.0):
    """LoRAModule.forward without the original module: ``lora_up(lora_down(x)) * multiplier * scale``."""
    return (x @ down.T) @ up.T * multiplier * scale


@pytest.mark.conversion
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kohya_alpha_is_a_0d_tensor_in_the_lora_dtype(tmp_path, dtype):
    from safetensors.torch import load_file

    path = _kohya_file(tmp_path, dtype)
    ours, _ = read_safetensors(path)
    alphas = {k: t for k, t in ours.items() if k.endswith(".alpha")}
    assert alphas
    assert {t.shape for t in alphas.values()} == {()}
    assert {t.dtype for t in alphas.values()} == {dtype}
    theirs = load_file(str(path))  # safetensors' own reader agrees
    assert {tuple(theirs[k].shape) for k in alphas} == {()}
    assert {str(theirs[k].dtype) for k in alphas} == {f"torch.{DTYPES[dtype]}"}


@pytest.mark.conversion
@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_kohya_alpha_not_representable_in_half_is_kept_in_float32(tmp_path, dtype):
    """sd-scripts would round 0.1 to fp16; we keep alpha/r exact instead (every loader reads fp32)."""
    ours, _ = read_safetensors(_kohya_file(tmp_path, dtype, alpha=0.1))
    alphas = [t for k, t in ours.items() if k.endswith(".alpha")]
    assert {(t.shape, t.dtype) for t in alphas} == {((), "F32")}
    assert {float(t.to_float()) for t in alphas} == {float(np.float32(0.1))}


@pytest.mark.conversion
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_sd_scripts_loads_our_kohya_alpha_without_upcasting(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    weights_sd = load_file(str(_kohya_file(tmp_path, dtype)))
    tdt = getattr(torch, DTYPES[dtype])
    for key in sorted(k for k in weights_sd if k.endswith(".alpha")):
        name = key[: -len(".alpha")]
        down, up = weights_sd[name + ".lora_down.weight"], weights_sd[name + ".lora_up.weight"]
        rank = down.size()[0]
        scale, buffer = sd_scripts_scale(weights_sd[key], rank)
        assert isinstance(scale, float) and scale == 3.0 / rank
        assert buffer.dim() == 0  # the buffer sd-scripts saves again stays 0-d
        x = torch.ones(2, down.shape[1], dtype=tdt)
        y = sd_scripts_forward(x, down, up, scale)  # bf16 must not raise
        assert y.dtype == tdt  # fp16 stays fp16


@pytest.mark.conversion
def test_the_sd_scripts_reimplementation_does_break_on_a_shape_1_alpha():
    """The check above can fail: a shape-[1] alpha (what we wrote before) upcasts fp16 and raises in bf16."""
    torch = pytest.importorskip("torch")
    down, up = torch.ones(2, 4), torch.ones(3, 2)
    scale, _ = sd_scripts_scale(torch.tensor([3.0], dtype=torch.float16), 2)
    assert not isinstance(scale, float)
    x = torch.ones(1, 4, dtype=torch.float16)
    assert sd_scripts_forward(x, down.half(), up.half(), scale).dtype == torch.float32
    scale, _ = sd_scripts_scale(torch.tensor([3.0], dtype=torch.bfloat16), 2)
    with pytest.raises(TypeError):
        sd_scripts_forward(x.bfloat16(), down.bfloat16(), up.bfloat16(), scale)


@pytest.mark.conversion
@pytest.mark.parametrize("shape", [(), (1,)])
def test_kohya_reader_accepts_0d_and_shape_1_alpha(tmp_path, shape):
    lora = make_lora(tiny_layout(), rank=2, alpha=3.0)
    tensors, meta = formats.tensors_for(lora, "kohya")
    for k in [k for k in tensors if k.endswith(".alpha")]:
        tensors[k] = Tensor("F32", np.full(shape, 5.0, dtype=np.float32))
    path = tmp_path / "k.safetensors"
    write_safetensors(path, tensors, meta)
    back = convert_mod.load_lora(path, layout=tiny_layout())
    assert {p.alpha for p in back.pairs.values()} == {5.0}


# ---------------------------------------------------------------- quiet CLI

NOISE = ("[transformers]", "requires torchvision", "Loading weights", "Writing model shards",
         "Loading pipeline components", "LOAD REPORT", "newly initialized", "Traceback")


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # the user's own environment must not be what keeps the frameworks quiet
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "lora_parity", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_quiet(proc: subprocess.CompletedProcess, what: str) -> None:
    found = [s for s in NOISE if s in proc.stderr]
    assert not found, f"{what}: stderr has {found}:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def cli_fixture(tmp_path_factory):
    pytest.importorskip("mindspore")
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("hygiene")
    proc = _cli(["fixture", "fx"], root)
    assert proc.returncode == 0, proc.stderr
    _assert_quiet(proc, "fixture")
    return root


@pytest.mark.image
def test_compare_is_quiet_and_writes_strict_json(cli_fixture):
    proc = _cli(["compare", "--pt-base", "fx/pt_base", "--ms-base", "fx/ms_base.ckpt", "--ms-lora",
                 "fx/ms_lora.ckpt", "--latents", "fx/latents.npy", "--steps", "2", "--report", "out"], cli_fixture)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_quiet(proc, "compare")
    # both denoising bars are labelled with their backend
    assert "pytorch:" in proc.stderr and "mindspore:" in proc.stderr
    data = strict_loads((cli_fixture / "out" / "report.json").read_text())
    if data["image"]["psnr"] is None:
        assert data["image"]["psnr_infinite"] is True


@pytest.mark.image
@pytest.mark.parametrize("backend", ["pt", "ms"])
def test_infer_is_quiet(cli_fixture, backend):
    args = ["infer", "--backend", backend, "--pt-base", "fx/pt_base", "--ms-lora", "fx/ms_lora.ckpt",
            "--steps", "2", "-o", f"{backend}.png", "--force"]
    if backend == "ms":
        args += ["--ms-base", "fx/ms_base.ckpt"]
    proc = _cli(args, cli_fixture)
    assert proc.returncode == 0, proc.stderr
    _assert_quiet(proc, f"infer --backend {backend}")
    assert {"pt": "pytorch:", "ms": "mindspore:"}[backend] in proc.stderr


@pytest.fixture(scope="module")
def broken_pipeline(cli_fixture):
    """The fixture's pipeline folder with one text_encoder weight removed (transformers would only warn)."""
    folder = cli_fixture / "broken_base"
    shutil.copytree(cli_fixture / "fx" / "pt_base", folder)
    weights = folder / "text_encoder" / "model.safetensors"
    tensors, meta = read_safetensors(weights)
    key = next(k for k in sorted(tensors) if k.endswith("layers.0.self_attn.k_proj.weight"))
    del tensors[key]
    weights.unlink()
    write_safetensors(weights, tensors, meta)
    return folder, key


@pytest.mark.image
@pytest.mark.parametrize("command", ["compare", "infer"])
def test_missing_component_weight_is_a_one_line_error(cli_fixture, broken_pipeline, command):
    folder, key = broken_pipeline
    if command == "compare":
        args = ["compare", "--pt-base", str(folder), "--ms-base", "fx/ms_base.ckpt", "--ms-lora", "fx/ms_lora.ckpt",
                "--latents", "fx/latents.npy"]
    else:
        args = ["infer", "--backend", "pt", "--pt-base", str(folder), "--ms-lora", "fx/ms_lora.ckpt",
                "-o", "broken.png", "--force"]
    proc = _cli(args, cli_fixture)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    # transformers 5 names CLIP-L's weights without the file's "text_model." prefix
    assert str(folder / "text_encoder") in lines[0] and key.removeprefix("text_model.") in lines[0]
    assert "missing" in lines[0]
    assert not (cli_fixture / "broken.png").exists()


@pytest.mark.image
def test_demo_is_quiet(tmp_path):
    pytest.importorskip("mindspore")
    pytest.importorskip("diffusers")
    proc = _cli(["demo", "--workdir", str(tmp_path / "demo")], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_quiet(proc, "demo")


@pytest.mark.conversion
def test_side_process_and_cli_import_no_framework_before_quieting_it():
    """quiet_environment()/quiet_frameworks() run in the side child (the latter before the PyTorch side
    imports diffusers) and first in each CLI command: that is only
    early enough if importing those modules does not already import transformers / diffusers."""
    code = ("import sys, lora_parity.sides.run, lora_parity.cli, lora_parity.demo, lora_parity.infer, "
            "lora_parity.fixtures.bundle; "
            "print(sorted(m for m in ('transformers', 'diffusers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
