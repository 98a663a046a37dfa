"""The PyTorch side of a capture: diffusers' own pipeline class, one component at a time.

Memory: a full-size SDXL in float32 (UNet 10.3 GB, text encoders 3.3 GB) does not fit a
16 GB budget as one pipeline, and the refiner's 12.3 GB not a 12 GB one.  So the pipeline
object is built three times over the same folder, each time with only one phase's modules
real: text encoders (the UNet on the meta device, as ``load_lora_weights`` reads its
config), then the UNet, then the VAE.  Each phase gets the LoRA tensors of its own
component through ``pipe.load_lora_weights`` and the checker that every tensor landed.
Prompt encoding (``pipe.encode_prompt``, incl. the negative branch) and the denoising loop
(``pipe(..., prompt_embeds=..., output_type="latent")``) are diffusers' own; only the
final VAE decode, which the pipeline does inline, is repeated here step for step.
"""
from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from lora_parity.parity.align import timestep_suffix
from lora_parity.errors import LoraParityError
from lora_parity.sides.memory import free_memory, peak_rss_bytes, reset_peak_rss, rss_bytes
from lora_parity.sides.request import SideRequest, SideResult
from lora_parity.sides.tokens import clip_tokenizers

TORCH_DTYPES = ("F32", "F16", "BF16")
PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionPipeline")
#: SD 1.x / 2.x: one CLIP text encoder, prompt_embeds = its last hidden state, no pooled / time-id conditioning
SD_PIPELINE = "StableDiffusionPipeline"


def _torch_dtype(name: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]


def pipeline_class(pipeline_dir: Path, library=None):
    """The folder's pipeline class (SDXL, SDXL img2img or SD 1.x / 2.x) from ``library`` (diffusers, or
    mindone.diffusers) and its index."""
    if library is None:
        import diffusers as library

    index = json.loads((pipeline_dir / "model_index.json").read_text())
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise LoraParityError(f"pipeline class {name!r} is not one compare runs ({', '.join(PIPELINES)})",
                              path=pipeline_dir / "model_index.json")
    return getattr(library, name), index


def split_lora(path: Path, folder: Path) -> dict[str, Path]:
    """The LoRA file cut into one file per component ("text", "unet"), header kept.

    diffusers' loader is called once per phase with the tensors of the modules that are
    real in that phase; PEFT and kohya names both start with their component's prefix.
    """
    from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors

    tensors, meta = read_safetensors(path)
    groups: dict[str, dict] = {"text": {}, "unet": {}}
    for k, t in tensors.items():
        unet = k.startswith(("unet.", "lora_unet_")) or k.startswith("unet_")
        groups["unet" if unet else "text"][k] = t
    out = {}
    for g, part in groups.items():
        if part:
            out[g] = folder / f"lora_{g}.safetensors"
            write_safetensors(out[g], part, meta)
    return out


def check_loading_info(folder: Path, info: dict) -> None:
    """Refuse a component whose weights do not match its model exactly.

    transformers and diffusers only warn when a checkpoint lacks a weight (it is then randomly
    initialised), has one the model does not use, or has one of another shape; the run would
    go on and a parity failure would blame the port.  One line naming the folder and a key.
    """
    problems = (("missing_keys", "is missing (the model would initialise it randomly)"),
                ("mismatched_keys", "has a shape the model does not expect"),
                ("unexpected_keys", "is not used by the model"))
    for field, what in problems:
        keys = sorted(_key_name(k) for k in info.get(field) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise LoraParityError(f"weight {what}{more}", path=folder, key=keys[0])
    errors = [e for e in info.get("error_msgs") or () if str(e).strip()]
    if errors:
        raise LoraParityError(f"cannot load weights: {str(errors[0]).splitlines()[0]}", path=folder)


def _key_name(entry) -> str:
    """transformers lists mismatched keys as (name, ckpt shape, model shape) tuples."""
    return str(entry[0]) if isinstance(entry, (tuple, list)) else str(entry)


class _Loader:
    """``from_pretrained`` of one component of the folder, in the run's dtype, or on the meta device."""

    def __init__(self, req: SideRequest, dtype):
        self.dir = Path(req.pipeline_dir)
        self.variant = req.variant
        self.dtype = dtype
        self.device = req.device if req.device.lower() != "cpu" else "cpu"

    def load(self, component: str):
        import transformers
        import diffusers

        cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
               "text_encoder": transformers.CLIPTextModel,
               "text_encoder_2": transformers.CLIPTextModelWithProjection}[component]
        if not (self.dir / component).is_dir():
            return None
        kwargs = {"subfolder": component, "local_files_only": True}
        if self.variant:
            kwargs["variant"] = self.variant
        kwargs["torch_dtype"] = self.dtype
        # the loading info, not a log line: quiet_frameworks() silences transformers' and
        # diffusers' "newly initialized" / "unexpected keys" warnings with the progress bars
        kwargs["output_loading_info"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                model, info = cls.from_pretrained(str(self.dir), **kwargs)
            except (OSError, ValueError, EnvironmentError) as exc:
                raise LoraParityError(f"cannot load {component}: {str(exc).splitlines()[0]}", path=self.dir) from None
        check_loading_info(self.dir / component, info)
        return model.to(self.device).eval()

    def meta_unet(self):
        import torch
        from diffusers import UNet2DConditionModel

        cfg = UNet2DConditionModel.load_config(str(self.dir), subfolder="unet")
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(cfg)

    def tokenizers(self) -> dict:
        return clip_tokenizers(self.dir)

    def scheduler(self):
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_pretrained(str(self.dir), subfolder="scheduler", local_files_only=True)


def _pipe(cls, **components):
    """The pipeline object over the given modules (None elsewhere), progress bars off."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
             "safety_checker", "feature_extractor")
    pipe = cls(**{n: components.get(n) for n in names if n in accepted}, **components.get("config", {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_config(cls, index: dict) -> dict:
    """The pipeline-level switches of model_index.json that this class takes; no watermark
    (the port has none)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    cfg = {k: index[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
           if k in index and k in accepted}
    if "requires_safety_checker" in accepted:  # SD 1.x / 2.x: no safety checker (the other side has none)
        cfg["requires_safety_checker"] = False
    if "add_watermarker" in accepted:
        cfg["add_watermarker"] = False
    return cfg


def capture_pt(req: SideRequest) -> SideResult:
    """Run diffusers for ``req``; activations by diffusers names (see :mod:`..backends.torch_backend`)."""
    import torch

    from lora_parity.backends.diffusers.view import TorchBackend, load_lora_checked
    from lora_parity.sides.environment import attention_kernels, torch_environment

    torch.manual_seed(0)
    from lora_parity.sides.threads import limit_torch_threads

    limit_torch_threads()
    from lora_parity.backends.flow import capture_flow, is_flow_folder

    if is_flow_folder(req.pipeline_dir):  # SD3 / Flux: the transformer families' own capture
        out = capture_flow(req, torch_lib(), {"side": "pt", "dtype": req.dtype, "versions": _versions()})
        out.meta["numerics_env"] = torch_environment(req, attention={})
        return out
    reset_peak_rss()
    t_start = time.perf_counter()
    dtype = _torch_dtype(req.dtype)
    loader = _Loader(req, dtype)
    cls, index = pipeline_class(loader.dir)
    config = pipeline_config(cls, index)
    refiner = bool(config.get("requires_aesthetics_score"))
    sd = cls.__name__ == SD_PIPELINE
    result = SideResult(meta={"side": "pt", "dtype": req.dtype, "pipeline": cls.__name__,
                              "versions": _versions(), "seconds": {}})
    tmp = tempfile.TemporaryDirectory(prefix="lora-parity-pt-")
    parts = split_lora(Path(req.lora), Path(tmp.name)) if req.lora else {}
    latents = req.arrays["latents"]
    cfg_on = req.steps is not None and req.guidance > 1.0
    lora_loaded: list[str] = []

    # ---- phase 1: text encoders (UNet on the meta device: only its config is read)
    t0 = time.perf_counter()
    toks = loader.tokenizers()
    te = {c: loader.load(c) for c in ("text_encoder", "text_encoder_2")}
    kernels = attention_kernels(**te)  # recorded in numerics_env
    pipe = _pipe(cls, **te, **toks, unet=loader.meta_unet(), scheduler=loader.scheduler(), config=config)
    if "text" in parts:
        lora_loaded += list(load_lora_checked(pipe, parts["text"]).loaded)
    be = TorchBackend.from_pipe(pipe, loader.dir, dtype=dtype)
    ids = be.token_ids(req.prompt)
    for name, value in ids.items():
        result.acts[f"_inputs.{name}"] = value
    if req.activations:
        result.acts.update(be.text_encoder_activations(**ids).values)
    replay = None
    if req.activations and req.replay:
        from lora_parity.backends.replay import DiffusersReplay, torch_framework

        replay = DiffusersReplay(torch_framework(), req, result)
        replay.text(te, ids)
    with torch.no_grad():
        embeds, pooled = be.encode_prompt(**ids, as_numpy=False)
        gen = None
        if req.steps is not None and sd:  # SD 1.x / 2.x's encode_prompt: (embeds, negative embeds)
            e, ne = pipe.encode_prompt(req.prompt, device=pipe.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=cfg_on)
            gen = {"prompt_embeds": e, **({"negative_prompt_embeds": ne} if cfg_on else {})}
        elif req.steps is not None:  # the pipeline's own encode_prompt, negative branch included
            e, ne, p, npool = pipe.encode_prompt(req.prompt, device=pipe.device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=cfg_on)
            gen = {"prompt_embeds": e, "pooled_prompt_embeds": p}
            if cfg_on:
                gen.update(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npool)
    if refiner and cfg_on:  # the negative prompt's token ids ("" tokenized), for the MindSpore side
        result.acts["_inputs.negative_input_ids_2"] = be.token_ids("")["input_ids_2"]
    del pipe, be, te
    free_memory()
    result.meta["seconds"]["text_encoders"] = time.perf_counter() - t0
    result.meta["rss_after_bytes"] = {"text_encoders": rss_bytes(), "peak_so_far": peak_rss_bytes()}

    # ---- phase 2: UNet, one forward per timestep, then the denoising loop
    t0 = time.perf_counter()
    unet = loader.load("unet")
    kernels.update(attention_kernels(unet=unet))
    pipe = _pipe(cls, **toks, unet=unet, scheduler=loader.scheduler(), config=config)
    pipe.vae_scale_factor = _vae_scale_factor(loader.dir)
    if "unet" in parts:
        lora_loaded += list(load_lora_checked(pipe, parts["unet"]).loaded)
    be = TorchBackend.from_pipe(pipe, loader.dir, dtype=dtype)
    result.acts["conditioning.prompt_embeds"] = embeds.float().numpy()
    time_ids = tproj = None
    if not sd:  # SDXL's vector conditioning: pooled text + the sinusoid of the size / crop (/ aesthetic) ids
        orig, crop, target = (tuple(int(v) for v in p) for p in req.size_cond)
        time_ids = be.add_time_ids(orig, crop, target, aesthetic=_aesthetic(req), pooled_dim=int(pooled.shape[-1]))
        with torch.no_grad():
            tproj = unet.add_time_proj(torch.as_tensor(time_ids).flatten()).reshape(time_ids.shape[0], -1)
        result.acts["conditioning.add_embedding_input"] = np.concatenate(
            [pooled.float().numpy(), tproj.float().numpy()], axis=-1)
    forward_s = []
    for t in (req.timesteps if req.activations else ()):
        t1 = time.perf_counter()
        acts = be.unet_activations(latents, t, embeds, pooled, time_ids)
        forward_s.append(time.perf_counter() - t1)
        suffix = timestep_suffix(t, req.timesteps)
        result.acts.update({k + suffix: v for k, v in acts.values.items()})
    result.meta["unet_forward_seconds"] = forward_s
    if replay is not None:
        x = torch.from_numpy(np.ascontiguousarray(latents)).to(unet.device, unet.dtype)
        replay.unet(unet, x, None if sd else torch.as_tensor(time_ids).to(x),
                    None if sd else tproj.double().cpu().numpy())
    final = None
    if req.steps is not None:
        final, per_step = _denoise(pipe, gen, req, latents, refiner, dtype, sd=sd)
        result.meta["seconds_per_step"] = per_step
    del pipe, be, unet
    free_memory()
    result.meta["seconds"]["unet"] = time.perf_counter() - t0
    result.meta["rss_after_bytes"].update(unet=rss_bytes(), peak_so_far_unet=peak_rss_bytes())

    # ---- phase 3: VAE decoder
    t0 = time.perf_counter()
    vae = loader.load("vae")
    pipe = _pipe(cls, vae=vae, scheduler=loader.scheduler(), config=config)
    be = TorchBackend.from_pipe(pipe, loader.dir, dtype=dtype)
    if req.activations:
        result.acts.update(be.vae_decode_activations(latents).values)
    if replay is not None:
        replay.vae(vae, _unscaled(vae, latents))
    if final is not None:
        result.images["image"] = _decode(pipe, final)
    del pipe, be, vae
    free_memory()
    result.meta["seconds"]["vae"] = time.perf_counter() - t0
    result.meta["lora_tensors_loaded"] = len(lora_loaded)
    result.meta["seconds"]["total"] = time.perf_counter() - t_start
    result.meta["peak_rss_bytes"] = peak_rss_bytes()
    result.meta["numerics_env"] = torch_environment(req, attention=kernels, scheduler=loader.scheduler())
    tmp.cleanup()
    return result


def torch_lib():
    """diffusers' side of the SD3 / Flux capture (:mod:`lora_parity.backends.flow`)."""
    import diffusers
    import torch
    import transformers

    from lora_parity.backends.diffusers.view import load_lora_checked
    from lora_parity.backends.flow import FlowLib, build_pipeline
    from lora_parity.backends.replay import torch_framework

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def load_pipeline(req, library):
        return build_pipeline(req, library, transformers, {"torch_dtype": dtypes[req.dtype]}, check_loading_info,
                              lambda m: m.eval() if isinstance(m, torch.nn.Module) else None)

    return FlowLib(
        name="diffusers", library=diffusers, modules=lambda root: root.named_modules(),
        register_hook=lambda m, hook: m.register_forward_hook(hook),
        is_tensor=lambda x: isinstance(x, torch.Tensor),
        to_numpy=lambda t: t.detach().to("cpu", torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t),
        tensor=lambda a, dt, like=None: torch.from_numpy(np.ascontiguousarray(a)).to(
            like.dtype if like is not None else dtypes[dt]),
        no_grad=torch.no_grad, load_pipeline=load_pipeline,
        load_lora=lambda pipe, path: list(load_lora_checked(pipe, path).loaded), framework=torch_framework)


def _aesthetic(req: SideRequest):
    return None if req.aesthetic is None else (float(req.aesthetic[0]), float(req.aesthetic[1]))


def _vae_scale_factor(pipeline_dir: Path) -> int:
    cfg = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def _denoise(pipe, gen: dict, req: SideRequest, latents: np.ndarray, refiner: bool, dtype, *, sd: bool = False):
    """``pipe(...)`` from the given start latents to final latents; and seconds per step."""
    import torch

    lat = torch.from_numpy(np.ascontiguousarray(latents)).to(pipe.device, dtype)
    scale = pipe.vae_scale_factor
    h, w = lat.shape[-2] * scale, lat.shape[-1] * scale
    orig, crop, target = (tuple(int(v) for v in p) for p in req.size_cond)
    ends: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        ends.append(time.perf_counter())
        return kwargs

    kwargs = dict(gen, latents=lat, num_inference_steps=int(req.steps), guidance_scale=float(req.guidance),
                  height=h, width=w, output_type="latent", callback_on_step_end=on_step_end)
    if not sd:  # SDXL's size conditioning
        kwargs.update(original_size=orig, crops_coords_top_left=crop, target_size=target)
    if refiner:  # img2img from the given (already noisy) latents over the whole schedule
        score, negative = _aesthetic(req) or (6.0, 2.5)
        kwargs.update(image=lat, strength=1.0, aesthetic_score=score, negative_aesthetic_score=negative)
        kwargs.pop("height"), kwargs.pop("width")
    pipe.set_progress_bar_config(disable=not req.progress, desc="pytorch", unit="step")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(**kwargs).images
    per_step = ((ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else (ends[-1] - t0 if ends else float("nan")))
    return out, per_step


def _unscaled(vae, latents):
    """The VAE decoder's input as the pipeline forms it: mean/std if configured, / scaling_factor."""
    import torch

    z = torch.from_numpy(np.ascontiguousarray(latents)).to(vae.device, vae.dtype)
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z)
        return z * std / cfg.scaling_factor + mean
    return z / cfg.scaling_factor


def _decode(pipe, latents):
    """The tail of diffusers' SDXL ``__call__``: upcast a float16 VAE if its config asks, unscale, decode,
    postprocess to float32 (H, W, 3) in [0, 1]."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        cfg = vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1).to(latents)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="np")
    return np.asarray(image[0], dtype=np.float32)


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}

