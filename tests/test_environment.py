"""The numerical environment: recorded by every capture, compared between bundles before judging.

Each refusal is shown to fire (a GPU host's default TF32 convolutions while claiming fp32, another
scheduler spacing) and to be waived, and recorded, by ``--allow-env-drift``; a difference that does
not make fp32 meaningless (the device) is printed and judged.  The describing functions run on the
real frameworks (torch, MindSpore on CPU); bundles are written from synthetic captures.
"""
from __future__ import annotations

import json

import pytest

from lora_parity.sides.bundle import read_bundle, write_bundle
from lora_parity.sides.environment import (
    NOT_ON_CPU,
    environment_drift,
    latents_source,
    mindspore_environment,
    port_environment,
    port_scheduler,
    torch_environment,
    torch_reduced_fp32,
)

from .helpers import run_cli
from .synthetic_sides import request, sides, write_configs

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return write_configs(tmp_path_factory.mktemp("configs"))


@pytest.fixture(scope="module")
def pt_env(configs):
    """What the PyTorch side records here (CPU), with real diffusers / transformers models' attention."""
    pytest.importorskip("diffusers")
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_parity.convert.tiny import TINY_TE1_CONFIG, TINY_UNET_CONFIG
    from lora_parity.fixtures.tiny_pipeline import SDXL_SCHEDULER_CONFIG
    from lora_parity.sides.environment import attention_kernels

    kernels = attention_kernels(unet=UNet2DConditionModel(**TINY_UNET_CONFIG),
                                text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TE1_CONFIG)))
    return torch_environment(request(configs, "pt"), attention=kernels,
                             scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))


@pytest.fixture(scope="module")
def ms_env(configs):
    pytest.importorskip("mindspore")
    return mindspore_environment(request(configs, "ms"), {"device_id": 0}, backend="mindone",
                                 scheduler=port_scheduler(configs), implements="EulerDiscreteScheduler")


# ---------------------------------------------------------------- what a capture records


def test_pytorch_environment_on_cpu(pt_env):
    import torch

    assert pt_env["device"] == "cpu" and pt_env["version"] == torch.__version__
    s = pt_env["settings"]
    assert s["float32_matmul_precision"] == "highest" and isinstance(s["cudnn_allow_tf32"], bool)
    assert pt_env["reduced_fp32"] == []  # cuDNN's TF32 default does nothing on a CPU
    assert "AttnProcessor2_0" in pt_env["attention"]["unet"] and isinstance(pt_env["attention"]["text_encoder"], str)
    assert pt_env["scheduler"] | {} == {"class": "EulerDiscreteScheduler", "timestep_spacing": "leading",
                                        "steps_offset": 1, "folder_class": "EulerDiscreteScheduler",
                                        "implementation": pt_env["scheduler"]["implementation"]}
    assert pt_env["vae"] == {"dtype": "F32", "force_upcast": True, "upcast": False, "decode_dtype": "F32"}
    assert pt_env["noise"] == "given latents (test)"
    assert json.dumps(pt_env, allow_nan=False)


def test_pytorch_reduced_precision_is_read_from_torch(configs):
    """A float32 matmul precision below 'highest' is recorded as reduced fp32; restored afterwards."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        env = torch_environment(request(configs, "pt"))
    finally:
        torch.set_float32_matmul_precision(before)
    assert "float32 matmul precision 'medium' (torch.set_float32_matmul_precision)" in env["reduced_fp32"]
    # torch >= 2.9 also lowers oneDNN's CPU matmul to bf16 for "medium": recorded as torch reports it
    assert set(env["reduced_fp32"]) <= {"float32 matmul precision 'medium' (torch.set_float32_matmul_precision)",
                                        "fp32_precision 'bf16' (torch.backends.mkldnn.matmul)"}
    assert torch_environment(request(configs, "pt"))["reduced_fp32"] == []  # restored


def test_tf32_flags_count_on_cuda_only():
    flags = {"matmul_allow_tf32": True, "cudnn_allow_tf32": True, "float32_matmul_precision": "highest"}
    assert torch_reduced_fp32("cpu", flags) == []
    assert len(torch_reduced_fp32("cuda:0", flags)) == 2
    assert torch_reduced_fp32("cpu", {**flags, "fp32_precision": {"mkldnn.matmul": "bf16"}}) == [
        "fp32_precision 'bf16' (torch.backends.mkldnn.matmul)"]


def test_mindspore_environment_on_cpu(configs, ms_env):
    s = ms_env["settings"]
    assert ms_env["device"] == "CPU" and s["mode"] in ("PyNative", "Graph")
    assert s["precision_mode"] == s["matmul_allow_hf32"] == s["conv_allow_hf32"] == NOT_ON_CPU
    assert ms_env["reduced_fp32"] == []
    assert ms_env["scheduler"]["class"] == "EulerDiscreteScheduler"
    assert ms_env["scheduler"]["implementation"] == "lora_parity.sampling.EulerSchedule"
    assert (ms_env["scheduler"]["timestep_spacing"], ms_env["scheduler"]["steps_offset"]) == ("leading", 1)
    port = port_environment(request(configs, "ms", backend="port", dtype="F16"), {"port_numerics": {"mode": "x"}})
    assert port["backend"] == "port" and port["settings"]["port_numerics"] == {"mode": "x"}
    assert port["vae"]["upcast"] is True and port["vae"]["decode_dtype"] == "F32"  # fp16 + force_upcast
    assert json.dumps(port, allow_nan=False)


def test_latents_source_names_the_file_or_the_generator(tmp_path):
    assert "make_latents" in latents_source(None) and "seed-0" in latents_source(None)
    assert str(tmp_path / "l.npy") in latents_source(tmp_path / "l.npy")


# ---------------------------------------------------------------- differences (pure)


def _gpu_host(pt_env: dict) -> dict:
    """The same capture as on a CUDA host with torch's defaults: cuDNN convolutions in TF32."""
    return {**pt_env, "device": "cuda:0", "reduced_fp32": torch_reduced_fp32("cuda:0", pt_env["settings"])}


def test_drift_rules(pt_env, ms_env):
    pairs = [("mindspore", "pytorch")]
    assert [d.text for d in environment_drift({"mindspore": ms_env, "pytorch": pt_env}, pairs)] == []
    tf32 = environment_drift({"mindspore": ms_env, "pytorch": _gpu_host(pt_env)}, pairs)
    assert [d.refuse for d in tf32 if "TF32 convolution" in d.text] == [True]
    assert any(d.text.startswith("device:") and not d.refuse for d in tf32)
    hf32 = {**ms_env, "reduced_fp32": ["HF32 convolution (conv_allow_hf32, CANN default)"]}
    assert [d.refuse for d in environment_drift({"mindspore": hf32, "pytorch": pt_env}, pairs)] == [True]
    hf16 = {**hf32, "dtype": "F16"}  # not claiming fp32: reported, not refused
    assert [d.refuse for d in environment_drift({"mindspore": hf16, "pytorch": pt_env}, pairs)] == [False]
    spacing = {**ms_env, "scheduler": {**ms_env["scheduler"], "timestep_spacing": "trailing"}}
    (d,) = environment_drift({"mindspore": spacing, "pytorch": pt_env}, pairs)
    assert d.refuse and d.text == "scheduler.timestep_spacing: mindspore 'trailing' vs pytorch 'leading'"
    upcast = {**ms_env, "vae": {**ms_env["vae"], "upcast": True}}
    assert any(d.refuse and d.text.startswith("vae.upcast") for d in
               environment_drift({"mindspore": upcast, "pytorch": pt_env}, pairs))
    (old,) = environment_drift({"mindspore": None, "pytorch": pt_env}, pairs)
    assert not old.refuse and "no numerical environment recorded" in old.text


# ---------------------------------------------------------------- bundles: printed, refused, allowed


def _bundles(configs, tmp_path, ms_env, pt_env):
    ms, pt = sides(configs, env=(ms_env, pt_env))
    ms_b = write_bundle(tmp_path / "ms", request(configs, "ms"), ms, base="synthetic", lora=None)
    pt_b = write_bundle(tmp_path / "pt", request(configs, "pt"), pt, base="synthetic", lora=None)
    return ms_b, pt_b


def test_manifest_carries_the_environment(configs, tmp_path, ms_env, pt_env):
    ms_b, pt_b = _bundles(configs, tmp_path, ms_env, pt_env)
    assert read_bundle(pt_b).manifest["numerics_env"] == pt_env
    assert read_bundle(ms_b).manifest["numerics_env"] == ms_env


def test_same_environment_judged_and_recorded(configs, tmp_path, ms_env, pt_env):
    ms_b, pt_b = _bundles(configs, tmp_path, ms_env, pt_env)
    code, out, err = run_cli(["compare", "--ms-bundle", str(ms_b), "--pt-bundle", str(pt_b), "--report",
                              str(tmp_path / "rep")])
    assert code == 0 and "environment:" not in out, out + err
    meta = json.loads((tmp_path / "rep" / "report.json").read_text())["meta"]
    assert meta["numerics_env"] == {"pytorch": pt_env, "mindspore": ms_env}
    assert "env_drift_allowed" not in meta


def test_tf32_on_a_gpu_host_is_refused_unless_allowed(configs, tmp_path, ms_env, pt_env):
    ms_b, pt_b = _bundles(configs, tmp_path, ms_env, _gpu_host(pt_env))
    code, out, err = run_cli(["compare", "--ms-bundle", str(ms_b), "--pt-bundle", str(pt_b)])
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-parity: error:")]
    assert code == 2 and len(lines) == 1, out + err
    assert "TF32 convolution" in lines[0] and "--allow-env-drift" in lines[0]
    printed = [ln for ln in out.splitlines() if ln.startswith("environment:")]
    assert any("TF32 convolution" in ln and ln.endswith("[refused]") for ln in printed), printed
    assert any(ln.startswith("environment: device: mindspore 'cpu' vs pytorch 'cuda:0'") for ln in printed), printed

    code, out, err = run_cli(["compare", "--ms-bundle", str(ms_b), "--pt-bundle", str(pt_b), "--allow-env-drift",
                              "--report", str(tmp_path / "rep")])
    assert code == 0, out + err
    allowed = json.loads((tmp_path / "rep" / "report.json").read_text())["meta"]["env_drift_allowed"]
    assert any("TF32 convolution" in d for d in allowed) and any(d.startswith("device:") for d in allowed)


def test_other_scheduler_spacing_is_refused(configs, tmp_path, ms_env, pt_env):
    other = {**pt_env, "scheduler": {**pt_env["scheduler"], "timestep_spacing": "trailing", "steps_offset": 0}}
    ms_b, pt_b = _bundles(configs, tmp_path, ms_env, other)
    code, out, err = run_cli(["compare", "--ms-bundle", str(ms_b), "--pt-bundle", str(pt_b)])
    assert code == 2 and "scheduler.timestep_spacing" in err and "scheduler.steps_offset" in err, out + err


def test_device_difference_alone_is_printed_and_judged(configs, tmp_path, ms_env, pt_env):
    ms_b, pt_b = _bundles(configs, tmp_path, {**ms_env, "device": "Ascend"}, pt_env)
    code, out, err = run_cli(["compare", "--ms-bundle", str(ms_b), "--pt-bundle", str(pt_b)])
    assert code == 0 and "environment: device: mindspore 'ascend' vs pytorch 'cpu'" in out, out + err


def test_a_direct_compare_refuses_reduced_fp32_unless_allowed(tmp_path, capsys):
    """One compare runs both sides in one environment, but a side may still compute below fp32 while
    claiming it (mindone's float16 attention in Flux): refused with the reason, judged with
    ``--allow-env-drift`` (the lines are returned for report.json)."""
    from lora_parity.compare import check_reduced_fp32
    from lora_parity.errors import LoraParityError
    from lora_parity.sides.request import SideResult

    phrase = "transformer: attention on float16-cast inputs"
    ms = SideResult(meta={"numerics_env": {"dtype": "F32", "reduced_fp32": [phrase]}})
    pt = SideResult(meta={"numerics_env": {"dtype": "F32", "reduced_fp32": []}})
    with pytest.raises(LoraParityError, match="float16-cast.*--allow-env-drift"):
        check_reduced_fp32(ms, pt, None, allow=False, where=tmp_path)
    allowed = check_reduced_fp32(ms, pt, None, allow=True, where=tmp_path)
    assert allowed and phrase in allowed[0] and "while claiming fp32" in allowed[0]
    assert check_reduced_fp32(pt, pt, None, allow=False, where=tmp_path) is None  # nothing to refuse
    assert "[refused]" in capsys.readouterr().out


# ---------------------------------------------------------------- the real captures record it


def test_one_shot_compare_records_both_environments(ms_backend, tmp_path):
    """compare on the fixture: both captures wrote numerics_env, report.json carries both."""
    pytest.importorskip("mindspore")
    from lora_parity.fixtures.bundle import write_fixture

    fx = write_fixture(tmp_path / "fx")
    argv = ["compare", "--ms-backend", ms_backend, "--pt-base", str(fx.pt_base), "--latents", str(fx.latents),
            "--ms-lora", str(fx.ms_lora), "--quiet", "--report", str(tmp_path / "rep")]
    if ms_backend == "port":
        argv += ["--ms-base", str(fx.ms_base)]
    code, out, err = run_cli(argv)
    assert code in (0, 1), out + err[-2000:]
    env = json.loads((tmp_path / "rep" / "report.json").read_text())["meta"]["numerics_env"]
    pt, ms = env["pytorch"], env["mindspore"]
    assert pt["framework"] == "torch" and pt["reduced_fp32"] == [] and "unet" in pt["attention"]
    assert ms["framework"] == "mindspore" and ms["backend"] == ms_backend and ms["reduced_fp32"] == []
    assert ms["settings"]["precision_mode"] == NOT_ON_CPU
    assert pt["noise"] == ms["noise"] == f"given latents (numpy .npy file {fx.latents})"
    assert environment_drift(env, [("mindspore", "pytorch")]) == [] or all(
        not d.refuse for d in environment_drift(env, [("mindspore", "pytorch")]))
    if ms_backend == "mindone":
        assert "cpu_compat_patched" in ms["settings"] and "unet" in ms["attention"]
