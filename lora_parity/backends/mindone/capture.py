"""The ``mindone`` backend's capture: mindone.diffusers' own SDXL pipeline, as MindONE users run it.

mindone.diffusers is a MindSpore port of diffusers with diffusers' module names, so its
activations are recorded under the same names as the PyTorch side's and align one to one.
Everything that computes is mindone's: the text encoders (mindone.transformers), the UNet,
the VAE, the Euler scheduler, ``encode_prompt``, the denoising loop (``pipe(...)``) and the
LoRA loader (``pipe.load_lora_weights`` of a PEFT file).  What this module adds:

* weights are loaded component by component with the loading info, and a component whose
  checkpoint lacks a weight (mindone would initialise it randomly), has one it does not use,
  or one of another shape is an error (:func:`.pt_side.check_loading_info`), never a warning;
* after ``load_lora_weights`` every LoRA tensor of the file must be a parameter of mindone's
  modules holding the file's values (:func:`check_lora_landed`);
* on CPU, the mint ops that have no CPU kernel in MindSpore 2.10 are routed to equivalents by
  :mod:`lora_parity.backends.mindone.compat` (nothing is patched on Ascend).

It runs in the interpreter that has mindone (``--ms-python``, default ``.venv-mindone``):
mindone 0.5.0 pins transformers 4.57, which cannot share an environment with diffusers 0.42.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from lora_parity.parity.align import timestep_suffix
from lora_parity.errors import LoraParityError
from lora_parity.sides.memory import free_memory, peak_rss_bytes, reset_peak_rss, rss_bytes
from lora_parity.backends.diffusers.capture import _aesthetic, check_loading_info, pipeline_class, pipeline_config
from lora_parity.sides.tokens import clip_tokenizers
from lora_parity.sides.request import SideRequest, SideResult

ADAPTER = "parity"
# the same blocks the PyTorch side hooks (lora_parity.backends.diffusers.view), by diffusers name
UNET_PATTERNS = (r"conv_in", r"time_embedding", r"add_embedding", r"down_blocks\.\d+\.(resnets|attentions)\.\d+",
                 r"down_blocks\.\d+\.downsamplers\.0", r"mid_block", r"up_blocks\.\d+\.(resnets|attentions)\.\d+",
                 r"up_blocks\.\d+\.upsamplers\.0", r"conv_out")
VAE_PATTERNS = (r"post_quant_conv", r"decoder\.conv_in", r"decoder\.mid_block", r"decoder\.up_blocks\.\d+",
                r"decoder\.conv_norm_out", r"decoder\.conv_out")


def _ms_dtype(name: str):
    import mindspore as ms

    return {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}[name]


def versions() -> dict:
    import mindspore
    import mindone
    import transformers

    return {"mindspore": mindspore.__version__, "mindone": getattr(mindone, "__version__", "?"),
            "transformers": transformers.__version__}


# ---------------------------------------------------------------- activation hooks


def _first(output):
    import mindspore as ms

    if isinstance(output, ms.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return _first(output[0])
    raise TypeError(f"cannot find a tensor in a cell output of type {type(output).__name__}")


def _to_numpy(t) -> np.ndarray:
    import mindspore as ms

    return t.astype(ms.float32).asnumpy().astype(np.float64)


@contextlib.contextmanager
def hooked(cell, patterns, prefix: str):
    """Forward hooks on the sub-cells whose names fully match ``patterns``; yields name -> float64 array,
    filled in the order the cells run (a cell run again gets ``#1``, ``#2`` ...)."""
    import re

    regexes = [re.compile(p) for p in patterns]
    out: dict[str, np.ndarray] = {}
    handles = []

    def make(key):
        def hook(_cell, _args, output):
            name, k = key, 0
            while name in out:
                k += 1
                name = f"{key}#{k}"
            out[name] = _to_numpy(_first(output))
        return hook

    try:
        for name, sub in cell.cells_and_names():
            if name and any(r.fullmatch(name) for r in regexes):
                handles.append(sub.register_forward_hook(make(prefix + name)))
        if not handles:
            raise LoraParityError(f"mindone's {type(cell).__name__} has none of the expected blocks")
        yield out
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- loading


class _Loader:
    """mindone's ``from_pretrained`` of one component, with its loading info checked."""

    def __init__(self, req: SideRequest):
        self.dir = Path(req.pipeline_dir)
        self.variant = req.variant
        self.dtype = _ms_dtype(req.dtype)

    def load(self, component: str):
        from mindone import diffusers as md
        from mindone import transformers as mt

        cls = {"unet": md.UNet2DConditionModel, "vae": md.AutoencoderKL, "text_encoder": mt.CLIPTextModel,
               "text_encoder_2": mt.CLIPTextModelWithProjection}[component]
        if not (self.dir / component).is_dir():
            return None
        kwargs = {"subfolder": component, "local_files_only": True, "mindspore_dtype": self.dtype,
                  "output_loading_info": True}
        if self.variant:
            kwargs["variant"] = self.variant
        try:
            model, info = cls.from_pretrained(str(self.dir), **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise LoraParityError(f"mindone cannot load {component}: {str(exc).splitlines()[0]}",
                                  path=self.dir) from None
        check_loading_info(self.dir / component, info)
        model.set_train(False)
        return model

    def tokenizers(self) -> dict:
        return clip_tokenizers(self.dir)

    def scheduler(self):
        from mindone.diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_pretrained(str(self.dir), subfolder="scheduler", local_files_only=True)


def pipeline(req: SideRequest, loader: _Loader):
    """mindone's pipeline class of the folder (SDXL, SDXL img2img, SD 1.x / 2.x) over freshly loaded, checked
    components."""
    import inspect

    from mindone import diffusers as md

    cls, index = pipeline_class(loader.dir, md)
    accepted = inspect.signature(cls.__init__).parameters
    comps = {c: loader.load(c) for c in ("text_encoder", "text_encoder_2", "unet", "vae") if c in accepted}
    config = pipeline_config(cls, index)
    toks = {"tokenizer": None, "tokenizer_2": None, **loader.tokenizers()}  # a refiner has no first tokenizer
    toks = {k: v for k, v in toks.items() if k in accepted}
    extra = {k: None for k in ("safety_checker", "feature_extractor") if k in accepted}
    pipe = cls(**comps, **toks, **extra, scheduler=loader.scheduler(), **config)
    pipe.set_progress_bar_config(disable=not req.progress, desc="mindone", unit="step")
    return pipe


_LORA_KEY = ("lora_A", "lora_B")


def _norm(key: str) -> str:
    return key.replace(".text_model.", ".")


def check_lora_landed(pipe, path: Path, adapter: str = ADAPTER) -> list[str]:
    """Every LoRA tensor of the PEFT file is a parameter of mindone's modules with the file's values.

    mindone's loader, like diffusers', only logs what it could not place; a half-loaded LoRA would
    then make a parity failure blame the wrong thing.  Returns the file keys that landed.
    """
    from lora_parity.convert.safetensors_io import read_safetensors

    tensors, _ = read_safetensors(path)
    wanted = {k: t for k, t in tensors.items() if any(f".{x}." in k for x in _LORA_KEY)}
    found = {}
    tag = f".{adapter}.weight"
    for comp in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for p in model.get_parameters():
            if p.name.endswith(tag) and any(f".{x}." in p.name for x in _LORA_KEY):
                found[_norm(f"{comp}.{p.name[: -len(tag)]}.weight")] = p
    if not found:
        raise LoraParityError("mindone's load_lora_weights injected no LoRA weight", path=path)
    unused = sorted(k for k in wanted if _norm(k) not in found)
    if unused:
        raise LoraParityError(f"{len(unused)} of {len(wanted)} LoRA tensors not used by mindone", path=path,
                              key=unused[0])
    for k, t in wanted.items():
        p = found[_norm(k)]
        held = p.asnumpy()  # in the run's dtype: the file's values rounded to it once
        value = held.astype(np.float32)
        want = t.to_float("float32").astype(held.dtype).astype(np.float32)
        if value.shape != tuple(t.shape) or not np.array_equal(value, want):
            raise LoraParityError("mindone's model holds other values than the file", path=path, key=k)
    return sorted(wanted)


# ---------------------------------------------------------------- capture


def capture_mindone(req: SideRequest) -> SideResult:
    """Run mindone.diffusers for ``req``; activations by diffusers names (as the PyTorch side)."""
    _quiet_imports()
    import mindspore as ms

    from lora_parity.backends.mindone.compat import apply_cpu_compat
    from lora_parity.device import use_device

    reset_peak_rss()
    t_start = time.perf_counter()
    settings = use_device(req.device)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    patched = apply_cpu_compat(req.device)
    settings["cpu_compat_patched"] = patched
    from lora_parity.sides.quiet import quiet_frameworks

    quiet_frameworks()
    from lora_parity.backends.flow import capture_flow, is_flow_folder

    if is_flow_folder(req.pipeline_dir):  # SD3 / Flux: the transformer families' own capture
        out = capture_flow(req, mindone_lib(), {"side": "ms", "backend": "mindone", "dtype": req.dtype,
                                                "versions": versions(), "mindspore_settings": settings})
        from lora_parity.sides.environment import mindspore_environment

        env = mindspore_environment(req, settings, backend="mindone", attention={})
        env["reduced_fp32"] = list(env.get("reduced_fp32") or ()) + out.meta.pop("reduced_attention", [])
        out.meta["numerics_env"] = env
        return out
    dtype = _ms_dtype(req.dtype)
    result = SideResult(meta={"side": "ms", "backend": "mindone", "dtype": req.dtype, "versions": versions(),
                              "mindspore_settings": settings, "seconds": {}})
    t0 = time.perf_counter()
    pipe = pipeline(req, _Loader(req))
    refiner = bool(getattr(pipe.config, "requires_aesthetics_score", False))
    sd = not hasattr(pipe, "text_encoder_2")  # SD 1.x / 2.x: no pooled text, no time ids
    landed: list[str] = []
    if req.lora:
        _check_peft(Path(req.lora))
        lora = Path(req.lora)
        try:  # folder + weight_name: with HF_HUB_OFFLINE set, mindone does not guess a file name
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=ADAPTER)
        except Exception as exc:  # noqa: BLE001 - any refusal of mindone's loader is the file's problem
            first = (str(exc).strip().splitlines() or [""])[0]
            raise LoraParityError(f"mindone's load_lora_weights refused the LoRA: {type(exc).__name__}: {first}",
                                  path=lora) from None
        landed = check_lora_landed(pipe, lora)
    result.meta["seconds"]["load"] = time.perf_counter() - t0
    result.meta["lora_tensors_loaded"] = len(landed)

    # ---- text encoders (the token ids of the request, or mindone's own tokenizers)
    t0 = time.perf_counter()
    ids = _token_ids(pipe, req, refiner)
    for k, v in ids.items():
        result.acts[f"_inputs.{k}"] = v
    embeds, pooled, acts = _encode(pipe, ids, dtype, sd=sd)
    if req.activations and not req.replay_only:
        result.acts.update(acts)
    replay = None
    if req.activations and req.replay and req.refs():
        from lora_parity.backends.replay import DiffusersReplay, mindspore_framework

        replay = DiffusersReplay(mindspore_framework(), req, result)
        replay.text({"text_encoder": pipe.text_encoder, "text_encoder_2": getattr(pipe, "text_encoder_2", None)},
                    ids)
    result.meta["seconds"]["text_encoders"] = time.perf_counter() - t0
    result.meta["rss_after_bytes"] = {"text_encoders": rss_bytes(), "peak_so_far": peak_rss_bytes()}

    # ---- UNet: one forward per timestep, then mindone's own denoising loop
    t0 = time.perf_counter()
    latents = req.arrays["latents"]
    time_ids = tproj = None
    if not sd:
        orig, crop, target = (tuple(int(v) for v in p) for p in req.size_cond)
        time_ids = _time_ids(pipe, orig, crop, target, refiner, req, int(pooled.shape[-1]), dtype)
        tproj = pipe.unet.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
    if not req.replay_only:
        result.acts["conditioning.prompt_embeds"] = _to_numpy(embeds).astype(np.float32)
        if not sd:
            result.acts["conditioning.add_embedding_input"] = np.concatenate(
                [_to_numpy(pooled), _to_numpy(tproj)], axis=-1).astype(np.float32)
    forward_s = []
    x = ms.Tensor(np.ascontiguousarray(latents), dtype)
    if replay is not None:
        replay.unet(pipe.unet, x, None if sd else time_ids.astype(dtype), None if sd else _to_numpy(tproj))
    for t in (req.timesteps if req.activations and not req.replay_only else ()):
        cond = None if sd else {"text_embeds": pooled.astype(dtype), "time_ids": time_ids.astype(dtype)}
        with hooked(pipe.unet, UNET_PATTERNS, "unet.") as got:
            t1 = time.perf_counter()
            pipe.unet(x, ms.Tensor(float(t), ms.float32), encoder_hidden_states=embeds.astype(dtype),
                      added_cond_kwargs=cond, return_dict=False)
            forward_s.append(time.perf_counter() - t1)
        suffix = timestep_suffix(t, req.timesteps)
        result.acts.update({k + suffix: v for k, v in got.items()})
    result.meta["unet_forward_seconds"] = forward_s
    final = None
    if req.steps is not None:
        final, per_step = _denoise(pipe, req, latents, refiner, dtype, sd=sd)
        result.meta["seconds_per_step"] = per_step
    result.meta["seconds"]["unet"] = time.perf_counter() - t0
    result.meta["rss_after_bytes"]["unet"] = rss_bytes()

    # ---- VAE decoder
    t0 = time.perf_counter()
    if req.activations and not req.replay_only:
        with hooked(pipe.vae, VAE_PATTERNS, "vae.") as got:
            pipe.vae.decode(_unscale(pipe.vae, ms.Tensor(np.ascontiguousarray(latents), dtype)), return_dict=False)
        result.acts.update(got)
    if replay is not None:
        replay.vae(pipe.vae, _unscale(pipe.vae, ms.Tensor(np.ascontiguousarray(latents), dtype)))
    if final is not None:
        result.images["image"] = _decode(pipe, final)
    result.meta["seconds"]["vae"] = time.perf_counter() - t0
    from lora_parity.sides.environment import mindone_environment

    result.meta["numerics_env"] = mindone_environment(req, settings, pipe)
    del pipe
    free_memory()
    result.meta["seconds"]["total"] = time.perf_counter() - t_start
    result.meta["peak_rss_bytes"] = peak_rss_bytes()
    return result


def mindone_lib():
    """mindone.diffusers' side of the SD3 / Flux capture (:mod:`lora_parity.backends.flow`)."""
    import mindspore as ms
    from mindone import diffusers as md
    from mindone import transformers as mt

    from lora_parity.backends.flow import FlowLib, build_pipeline
    from lora_parity.backends.mindone.attention_precision import reduced_attention
    from lora_parity.backends.replay import mindspore_framework

    dtypes = {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}

    def load_pipeline(req, library):
        return build_pipeline(req, library, mt, {"mindspore_dtype": dtypes[req.dtype]}, check_loading_info,
                              lambda m: m.set_train(False) if isinstance(m, ms.nn.Cell) else None)

    def load_lora(pipe, path: Path) -> list:
        _check_peft(path)
        try:  # folder + weight_name: offline, mindone does not guess a file name
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=ADAPTER)
        except Exception as exc:  # noqa: BLE001 - any refusal of mindone's loader is the file's problem
            first = (str(exc).strip().splitlines() or [""])[0]
            raise LoraParityError(f"mindone's load_lora_weights refused the LoRA: {type(exc).__name__}: {first}",
                                  path=path) from None
        return check_lora_landed(pipe, path)

    def to_numpy(t):
        return t.astype(ms.float32).asnumpy().astype(np.float64) if isinstance(t, ms.Tensor) else np.asarray(t)

    return FlowLib(
        name="mindone", library=md, modules=lambda root: root.cells_and_names(),
        register_hook=lambda m, hook: m.register_forward_hook(hook),
        is_tensor=lambda x: isinstance(x, ms.Tensor), to_numpy=to_numpy,
        tensor=lambda a, dt, like=None: ms.Tensor(np.ascontiguousarray(a)).astype(
            like.dtype if like is not None else dtypes[dt]),
        no_grad=contextlib.nullcontext, load_pipeline=load_pipeline, load_lora=load_lora,
        framework=mindspore_framework, reduced_attention=reduced_attention)


def _quiet_imports() -> None:
    """Import mindone without its import-time chatter, which says nothing about this run: MindSpore's
    deprecation notices (``GLOG_v`` 3 = errors only, unless the user set it), transformers 4.57's
    "Config not found for parakeet" prints and mindone's FutureWarnings about its own arguments.
    Loading problems are not silenced: they come back from the loading info as errors."""
    import io
    import os
    import warnings

    os.environ.setdefault("GLOG_v", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.redirect_stdout(io.StringIO()):
        import mindone.diffusers  # noqa: F401
        import mindone.transformers  # noqa: F401


def _check_peft(path: Path) -> None:
    """mindone.diffusers loads PEFT/diffusers-named LoRAs; a MindONE ``.ckpt`` must be converted first."""
    if path.suffix == ".ckpt":
        raise LoraParityError("the mindone backend loads a PEFT safetensors LoRA; convert the .ckpt first "
                              "(compare does it for you with --ms-lora)", path=path)


def _token_ids(pipe, req: SideRequest, refiner: bool) -> dict[str, np.ndarray]:
    """The request's token ids if it has them (PyTorch's, in a one-machine compare), else mindone's tokenizers'.

    With both present they must agree: a tokenizer difference would otherwise show up as a
    text-encoder "parity" failure."""
    own = {}
    for key, tok in (("input_ids", pipe.tokenizer), ("input_ids_2", getattr(pipe, "tokenizer_2", None))):
        if tok is not None:
            own[key] = tok(req.prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="np").input_ids.astype(np.int64)
    given = {k: np.asarray(req.arrays[k], np.int64) for k in own if k in req.arrays}
    for k, v in given.items():
        if not np.array_equal(v, own[k]):
            raise LoraParityError(f"mindone's tokenizer gives other token ids ({k}) than the request's for the prompt",
                                  path=Path(req.pipeline_dir) / ("tokenizer" if k == "input_ids" else "tokenizer_2"))
    return {**own, **given}


def _encode(pipe, ids: dict, dtype, *, sd: bool = False):
    """``(prompt_embeds, pooled, activations)``: what the pipeline's ``encode_prompt`` computes for these ids
    (SDXL: penultimate hidden states concatenated, pooled projection of the last encoder; SD 1.x / 2.x: the
    encoder's last hidden state, no pooled), every layer recorded."""
    import mindspore as ms
    from mindspore import ops

    acts, hidden, pooled = {}, [], None
    for comp, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2")):
        te = getattr(pipe, comp, None)
        if te is None or key not in ids:
            continue
        out = te(ms.Tensor(ids[key]), output_hidden_states=True, return_dict=False)
        if comp == "text_encoder":  # CLIPTextModel: (last_hidden_state, pooler_output, hidden_states)
            last, pool, states = out[0], out[1], out[2]
            pooled_name = "pooler_output"
        else:  # CLIPTextModelWithProjection: (text_embeds, last_hidden_state, hidden_states)
            pool, last, states = out[0], out[1], out[2]
            pooled_name = "text_embeds"
        for i, h in enumerate(states):
            acts[f"{comp}.hidden_states.{i}"] = _to_numpy(h)
        acts[f"{comp}.last_hidden_state"] = _to_numpy(last)
        acts[f"{comp}.{pooled_name}"] = _to_numpy(pool)
        hidden.append(states[-2])
        pooled = pool
    if sd:
        return last.astype(dtype), None, acts
    embeds = ops.concat(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
    return embeds.astype(dtype), pooled.astype(dtype), acts


def _time_ids(pipe, orig, crop, target, refiner, req, proj_dim, dtype):
    if refiner:
        score, negative = _aesthetic(req) or (6.0, 2.5)
        ids, _ = pipe._get_add_time_ids(orig, crop, target, score, negative, orig, crop, target, dtype=dtype,
                                        text_encoder_projection_dim=proj_dim)
        return ids
    return pipe._get_add_time_ids(orig, crop, target, dtype=dtype, text_encoder_projection_dim=proj_dim)


def _unscale(vae, z):
    import mindspore as ms

    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m = ms.Tensor(np.asarray(mean, np.float32).reshape(1, -1, 1, 1)).astype(z.dtype)
        s = ms.Tensor(np.asarray(std, np.float32).reshape(1, -1, 1, 1)).astype(z.dtype)
        return z * s / cfg.scaling_factor + m
    return z / cfg.scaling_factor


def _denoise(pipe, req: SideRequest, latents: np.ndarray, refiner: bool, dtype, *, sd: bool = False):
    """mindone's ``pipe(...)`` from the given start latents to final latents (its own encode_prompt,
    negative branch, scheduler and guidance); and seconds per step."""
    import mindspore as ms

    lat = ms.Tensor(np.ascontiguousarray(latents), dtype)
    scale = pipe.vae_scale_factor
    h, w = latents.shape[-2] * scale, latents.shape[-1] * scale
    orig, crop, target = (tuple(int(v) for v in p) for p in req.size_cond)
    ends: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        ends.append(time.perf_counter())
        return kwargs

    kwargs = dict(prompt=req.prompt, latents=lat, num_inference_steps=int(req.steps),
                  guidance_scale=float(req.guidance), height=h, width=w, output_type="latent",
                  callback_on_step_end=on_step_end)
    if not sd:  # SDXL's size conditioning
        kwargs.update(original_size=orig, crops_coords_top_left=crop, target_size=target)
    if refiner:
        score, negative = _aesthetic(req) or (6.0, 2.5)
        kwargs.update(image=lat, strength=1.0, aesthetic_score=score, negative_aesthetic_score=negative)
        kwargs.pop("height"), kwargs.pop("width")
    t0 = time.perf_counter()
    out = pipe(**kwargs)
    images = out[0] if isinstance(out, (tuple, list)) else out.images
    per_step = ((ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else (ends[-1] - t0 if ends else float("nan")))
    return images, per_step


def _decode(pipe, latents) -> np.ndarray:
    """The tail of the pipeline's ``__call__``: upcast a float16 VAE if its config asks, unscale, decode,
    to float32 (H, W, 3) in [0, 1] as the PyTorch side does."""
    import mindspore as ms

    vae = pipe.vae
    if vae.dtype == ms.float16 and vae.config.force_upcast:
        pipe.upcast_vae()  # what mindone's __call__ does
    z = _unscale(vae, latents.astype(vae.dtype))
    image = vae.decode(z, return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type="np")
    return np.asarray(image[0], dtype=np.float32)

__all__ = ["capture_mindone", "check_lora_landed", "hooked", "versions"]
