"""The numerical environment of a capture: what changes results without changing code.

Two captures of the same model, LoRA and inputs can still differ because of settings outside
the code: TF32 on a CUDA GPU (cuDNN convolutions use it by default), HF32 on Ascend (CANN
converts float32 convolutions to HF32 by default), a mixed ``precision_mode``, another attention
kernel, a VAE that is or is not upcast, another scheduler spacing or offset, another source of
the initial noise.  On one machine ``compare`` controls most of them; between two machines
(capture bundles) nothing does.  So every capture records them as ``meta["numerics_env"]``
(:func:`torch_environment`, :func:`mindspore_environment`), and :func:`environment_drift` lists
what differs between two captures, marking what makes an fp32 comparison meaningless
(``compare --ms-bundle/--pt-bundle`` refuses those unless ``--allow-env-drift``).

What is recorded is read from the framework where it can be read; what cannot be read is said
("n/a on CPU", "not set: CANN default ..."), never guessed.  Frameworks are imported lazily: the
describing functions run inside a side's own process, :func:`environment_drift` anywhere.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

NOT_ON_CPU = "n/a on CPU"
# Ascend precision modes that keep float32 ops in float32 (the others may lower them to fp16 / bf16)
KEEP_FP32_MODES = ("must_keep_origin_dtype", "force_fp32")
# MindSpore 2.10's documented defaults when nothing was set (mindspore.device_context.ascend.op_precision)
ASCEND_DEFAULTS = {"precision_mode": "must_keep_origin_dtype",  # "the framework sets ... by default"
                   "matmul_allow_hf32": False,  # "CANN disables FP32 to HF32 for Matmul operators by default"
                   "conv_allow_hf32": True}  # "CANN enables FP32 to HF32 for Conv operators by default"
GIVEN_LATENTS_GENERATOR = ("given latents (numpy, seed-0 generator of "
                           "lora_parity.fixtures.tiny_pipeline.make_latents)")


def latents_source(path: str | Path | None) -> str:
    """Where ``compare`` / ``capture`` took the start latents from (both sides get the same array)."""
    if path is not None:
        return f"given latents (numpy .npy file {path})"
    return GIVEN_LATENTS_GENERATOR


# ---------------------------------------------------------------- parts both sides share


def vae_numerics(pipeline_dir: str | Path, dtype: str) -> dict:
    """The VAE's dtype and whether the image is decoded upcast to float32.

    Every backend applies diffusers' rule (a float16 VAE whose config has ``force_upcast`` decodes
    in float32); recorded so that two captures that applied it differently show it."""
    f = Path(pipeline_dir) / "vae" / "config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    force = bool(cfg.get("force_upcast", True))  # AutoencoderKL's default
    upcast = dtype == "F16" and force
    return {"dtype": dtype, "force_upcast": force, "upcast": upcast, "decode_dtype": "F32" if upcast else dtype}


def _setting(config, key: str):
    if isinstance(config, dict) or hasattr(config, "get"):
        try:
            return config.get(key)
        except TypeError:
            pass
    return getattr(config, key, None)


def scheduler_numerics(scheduler, pipeline_dir: str | Path, *, implements: str | None = None) -> dict:
    """Class, ``timestep_spacing`` and ``steps_offset`` of the scheduler a side actually runs.

    ``scheduler``: a diffusers / mindone.diffusers scheduler object, or this project's
    :class:`~lora_parity.sampling.EulerSchedule` (``implements`` names the diffusers class it
    reproduces).  The folder's ``scheduler_config.json`` class is recorded beside it."""
    f = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
    folder = json.loads(f.read_text()) if f.is_file() else {}
    config = getattr(scheduler, "config", scheduler)
    offset = _setting(config, "steps_offset")
    return {"class": implements or type(scheduler).__name__,
            "implementation": f"{type(scheduler).__module__}.{type(scheduler).__qualname__}",
            "timestep_spacing": _setting(config, "timestep_spacing"),
            "steps_offset": None if offset is None else int(offset),
            "folder_class": folder.get("_class_name")}


def attention_kernels(**models) -> dict:
    """The attention implementation of each given model, by component name.

    diffusers-style models (diffusers, mindone.diffusers): the attention processor classes
    (``AttnProcessor2_0`` ...); transformers-style text encoders: ``config._attn_implementation``
    (``sdpa``, ``eager`` ...).  A model exposing neither is left out."""
    out: dict = {}
    for name, model in models.items():
        if model is None:
            continue
        procs = getattr(model, "attn_processors", None)
        if isinstance(procs, dict) and procs:
            out[name] = sorted({type(p).__name__ for p in procs.values()})
            continue
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl:
            out[name] = str(impl)
    return out


def _common(req, backend: str, *, attention: dict | None, scheduler: dict | None) -> dict:
    return {"backend": backend, "dtype": req.dtype, "attention": attention or {},
            "vae": vae_numerics(req.pipeline_dir, req.dtype), "scheduler": scheduler,
            "noise": getattr(req, "noise_source", None) or "given latents (numpy array in the request; "
                                                              "source not recorded)"}


# ---------------------------------------------------------------- PyTorch


def _torch_settings(torch) -> dict:
    """What torch says about float32 precision, read without changing anything."""
    b = torch.backends
    with warnings.catch_warnings():  # newer torch deprecates allow_tf32 in favour of fp32_precision
        warnings.simplefilter("ignore")
        out = {"matmul_allow_tf32": bool(b.cuda.matmul.allow_tf32), "cudnn_allow_tf32": bool(b.cudnn.allow_tf32),
               "float32_matmul_precision": torch.get_float32_matmul_precision()}
        fp32 = {}
        for name, obj in (("global", b), ("cuda.matmul", b.cuda.matmul), ("cudnn.conv", getattr(b.cudnn, "conv", None)),
                          ("mkldnn.matmul", getattr(b.mkldnn, "matmul", None)),
                          ("mkldnn.conv", getattr(b.mkldnn, "conv", None))):
            value = getattr(obj, "fp32_precision", None) if obj is not None else None
            if isinstance(value, str):
                fp32[name] = value
        out["fp32_precision"] = fp32  # torch >= 2.9's per-backend setting ("none"/"ieee" = exact)
    sdpa = {}
    for kind in ("flash", "mem_efficient", "math", "cudnn"):
        fn = getattr(b.cuda, f"{kind}_sdp_enabled", None)
        if fn is not None:
            sdpa[kind] = bool(fn())
    out["sdpa_cuda_backends_enabled"] = sdpa  # CUDA only: on CPU, SDPA picks its own kernel
    out["deterministic_algorithms"] = bool(torch.are_deterministic_algorithms_enabled())
    out["num_threads"] = int(torch.get_num_threads())
    return out


def torch_reduced_fp32(device: str, settings: dict) -> list[str]:
    """The settings under which torch computes float32 math with fewer mantissa bits, one phrase each.

    TF32 flags act on CUDA only (``cudnn.allow_tf32`` is True by default, also in CPU builds,
    where nothing uses it); a float32 matmul precision other than ``highest`` and a mkldnn
    ``fp32_precision`` of ``tf32``/``bf16`` act on the CPU too."""
    out = []
    cuda = str(device).lower().startswith("cuda")
    if cuda and settings.get("matmul_allow_tf32"):
        out.append("TF32 matmul (torch.backends.cuda.matmul.allow_tf32)")
    if cuda and settings.get("cudnn_allow_tf32"):
        out.append("TF32 convolution (torch.backends.cudnn.allow_tf32, on by default)")
    prec = settings.get("float32_matmul_precision")
    if prec not in (None, "highest"):
        out.append(f"float32 matmul precision {prec!r} (torch.set_float32_matmul_precision)")
    for name, value in (settings.get("fp32_precision") or {}).items():
        # the CUDA entries mirror the allow_tf32 flags above; mkldnn's act on the CPU; "global" on both
        applies = name == "global" or (name.startswith("mkldnn") and not cuda)
        if applies and value in ("tf32", "bf16"):
            out.append(f"fp32_precision {value!r} (torch.backends.{name})")
    return out


def torch_environment(req, *, attention: dict | None = None, scheduler=None) -> dict:
    """The PyTorch side's numerical environment (``capture_pt``): device, TF32 / matmul precision,
    attention kernels, VAE upcast, scheduler, noise source."""
    import torch

    settings = _torch_settings(torch)
    device = str(req.device if str(req.device).lower() != "cpu" else "cpu")
    env = {"framework": "torch", "version": torch.__version__, "device": device, "settings": settings,
           "reduced_fp32": torch_reduced_fp32(device, settings)}
    sched = scheduler_numerics(scheduler, req.pipeline_dir) if scheduler is not None else None
    env.update(_common(req, "diffusers", attention=attention, scheduler=sched))
    return env


# ---------------------------------------------------------------- MindSpore


def _ascend_value(ms, key: str):
    """An Ascend op-precision setting as MindSpore holds it ("" / None: not set)."""
    try:
        from mindspore._c_expression import AscendOpPrecisionConf  # Ascend builds only

        conf = AscendOpPrecisionConf.get_instance()
        value = getattr(conf, key)()
        if value not in ("", None):
            return value
    except (ImportError, AttributeError, RuntimeError):
        pass
    value = (ms.get_context("ascend_config") or {}).get(key)
    if value in ("", None):
        try:
            value = ms.get_context(key)
        except (ValueError, RuntimeError):
            value = None
    return None if value in ("", None) else value


def _as_bool(value) -> bool:
    return value in (True, 1, "1", "true", "True", "enable")


def ascend_precision(ms) -> tuple[dict, list[str]]:
    """(the Ascend precision settings, the reduced-precision phrases they imply); unset values are
    MindSpore 2.10's documented defaults and say so."""
    settings, reduced = {}, []
    for key, default in ASCEND_DEFAULTS.items():
        value = _ascend_value(ms, key)
        settings[key] = value if value is not None else f"not set (default {default})"
        effective = value if value is not None else default
        if key == "precision_mode" and effective not in KEEP_FP32_MODES:
            reduced.append(f"precision_mode {effective!r} (float32 ops may run in fp16/bf16)")
        elif key != "precision_mode" and _as_bool(effective):
            what = "matmul" if key.startswith("matmul") else "convolution"
            how = "set" if value is not None else "CANN default"
            reduced.append(f"HF32 {what} ({key}, {how}; mindspore.device_context.ascend.op_precision.{key}(False) "
                           f"turns it off)")
    return settings, reduced


def mindspore_environment(req, settings: dict | None = None, *, backend: str, attention: dict | None = None,
                          scheduler=None, implements: str | None = None) -> dict:
    """The MindSpore side's numerical environment (``capture_ms`` / ``capture_mindone``): device,
    execution mode, Ascend ``precision_mode`` and HF32 settings, the CPU compat layer (mindone),
    VAE upcast, scheduler, noise source.  ``settings``: the capture's ``mindspore_settings``."""
    import mindspore as ms

    settings = dict(settings or {})
    device = ms.get_context("device_target")
    mode = {ms.PYNATIVE_MODE: "PyNative", ms.GRAPH_MODE: "Graph"}.get(ms.get_context("mode"), "unknown")
    out = {"device_target": device, "device_id": settings.get("device_id"), "mode": mode,
           "graph_cells": bool(getattr(req, "graph", False)),  # the port's --ms-graph: image cells jit-compiled
           "deterministic": ms.get_context("deterministic"),
           "runtime_num_threads": ms.get_context("runtime_num_threads")}
    if device == "Ascend":
        precision, reduced = ascend_precision(ms)
        out.update(precision)
    else:
        where = NOT_ON_CPU if device == "CPU" else f"n/a on {device}"
        out.update(precision_mode=where, matmul_allow_hf32=where, conv_allow_hf32=where)
        reduced = []
    if "cpu_compat_patched" in settings:
        out["cpu_compat_patched"] = settings["cpu_compat_patched"]
    if "port_numerics" in settings:
        out["port_numerics"] = settings["port_numerics"]
    env = {"framework": "mindspore", "version": ms.__version__, "device": device, "settings": out,
           "reduced_fp32": reduced}
    sched = (scheduler_numerics(scheduler, req.pipeline_dir, implements=implements)
             if scheduler is not None else None)
    env.update(_common(req, backend, attention=attention, scheduler=sched))
    return env


def port_scheduler(pipeline_dir: str | Path):
    """The port's schedule (diffusers' EulerDiscreteScheduler reproduced), or None when the folder's
    scheduler is not one the port models (the image run would refuse it)."""
    from lora_parity.sampling import EulerSchedule

    try:
        return EulerSchedule.from_pipeline_dir(pipeline_dir, 1)
    except (OSError, ValueError):
        return None


# the port's attention is its own MindSpore ops (lora_parity.backends.port.layers.attention)
PORT_ATTENTION = "port layers.attention: BatchMatMul + softmax + BatchMatMul (no fused kernel)"


def port_environment(req, settings: dict | None) -> dict:
    """:func:`mindspore_environment` of the port (``capture_ms``): its schedule reproduces diffusers'
    EulerDiscreteScheduler, its attention is its own ops."""
    return mindspore_environment(req, settings, backend="port", attention={"all": PORT_ATTENTION},
                                 scheduler=port_scheduler(req.pipeline_dir), implements="EulerDiscreteScheduler")


def mindone_environment(req, settings: dict | None, pipe) -> dict:
    """:func:`mindspore_environment` of the mindone backend (``capture_mindone``), read from its pipeline."""
    attention = attention_kernels(unet=getattr(pipe, "unet", None), text_encoder=getattr(pipe, "text_encoder", None),
                                  text_encoder_2=getattr(pipe, "text_encoder_2", None))
    return mindspore_environment(req, settings, backend="mindone", attention=attention,
                                 scheduler=getattr(pipe, "scheduler", None))


# ---------------------------------------------------------------- differences between two captures


@dataclass(frozen=True)
class Drift:
    """One difference between two captures' environments (or one side's setting that matters alone)."""

    text: str
    refuse: bool  # makes an fp32 comparison meaningless


# (path in the environment, refused when the two differ)
COMPARED = (("scheduler.class", True), ("scheduler.timestep_spacing", True), ("scheduler.steps_offset", True),
            ("vae.upcast", True), ("vae.force_upcast", False), ("vae.decode_dtype", False), ("device", False),
            ("noise", False))


def _get(env: dict, path: str):
    value = env
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def environment_drift(envs: dict[str, dict | None], pairs: list[tuple[str, str]]) -> list[Drift]:
    """Every difference between the named environments, one line each.

    ``envs``: side name -> ``numerics_env`` (None: not recorded, e.g. a bundle from an older
    version); ``pairs``: which sides are compared with which (the MindSpore capture with the
    PyTorch capture of its own dtype).  Refused: reduced float32 precision (TF32 / HF32 /
    precision_mode) in any capture that claims fp32, and a different scheduler class, spacing or
    offset or VAE upcast between a pair."""
    out: list[Drift] = []
    for name, env in envs.items():
        if env is None:
            out.append(Drift(f"{name}: no numerical environment recorded (captured by an older lora-parity)", False))
            continue
        for phrase in env.get("reduced_fp32") or ():
            fp32 = env.get("dtype") == "F32"
            out.append(Drift(f"{name} ({env.get('dtype')}): {phrase}" + (" while claiming fp32" if fp32 else ""), fp32))
    for a, b in pairs:
        ea, eb = envs.get(a), envs.get(b)
        if ea is None or eb is None:
            continue
        for path, refuse in COMPARED:
            va, vb = _get(ea, path), _get(eb, path)
            if path == "device":
                va, vb = str(va).lower(), str(vb).lower()
            if va != vb:
                out.append(Drift(f"{path}: {a} {va!r} vs {b} {vb!r}", refuse))
        ka, kb = ea.get("attention") or {}, eb.get("attention") or {}
        for comp in sorted(set(ka) & set(kb)):
            if ka[comp] != kb[comp]:
                out.append(Drift(f"attention.{comp}: {a} {ka[comp]!r} vs {b} {kb[comp]!r}", False))
    return out


def check_bundle_drift(ms_meta: dict, pt_meta: dict, pt_low_meta: dict | None, *, allow: bool,
                       where: str) -> list[str] | None:
    """Print every environment difference between bundles (one line each), then refuse the ones that make
    an fp32 comparison meaningless unless ``allow``; returns the printed lines when ``allow`` (recorded in
    report.json as ``env_drift_allowed``), else None."""
    from lora_parity.errors import LoraParityError

    envs = {"mindspore": ms_meta.get("numerics_env"), "pytorch": pt_meta.get("numerics_env")}
    pairs = [("mindspore", "pytorch")]
    if pt_low_meta is not None:
        low = f"pytorch_{(pt_low_meta.get('dtype') or 'low').lower()}"
        envs[low] = pt_low_meta.get("numerics_env")
        pairs = [("mindspore", low)]  # the VAE upcast / dtype of a low-precision run: against its own dtype
    drift = environment_drift(envs, pairs)
    for d in drift:
        print(f"environment: {d.text}" + (" [refused]" if d.refuse and not allow else ""))
    refused = [d.text for d in drift if d.refuse]
    if refused and not allow:
        raise LoraParityError(f"numerical environments make this comparison meaningless: {'; '.join(refused)} "
                              f"(--allow-env-drift judges anyway)", path=where)
    return [d.text for d in drift] if allow else None
