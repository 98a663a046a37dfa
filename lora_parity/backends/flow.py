"""SD3 and Flux captures: diffusers' and mindone.diffusers' own pipelines, hooked by diffusers names.

mindone.diffusers mirrors diffusers module for module (same pipeline classes, component names,
``encode_prompt`` and ``__call__`` signatures, block outputs), so one capture serves both sides;
:class:`FlowLib` holds the few calls that differ (hooks, tensors, loading, the LoRA checker).

What is recorded, each point named alike on both sides:

* every text encoder's layers while the pipeline's own ``encode_prompt`` runs: CLIP
  ``<comp>.embeddings`` / ``encoder.layers.N`` / ``final_layer_norm``, T5 ``<comp>.encoder.embed_tokens``
  / ``encoder.block.N`` / ``encoder.final_layer_norm`` (``text_model.`` dropped: transformers 5 has none);
* its results ``conditioning.prompt_embeds`` and ``conditioning.pooled_prompt_embeds`` (the
  negative branch too under guidance);
* the transformer's embedders and every block (a joint / double block gives the image stream under
  its name and the text stream as ``<name>.context``), the output norm and projection, for every
  denoising step of the pipeline's own loop (``#1``, ``#2`` ... for the later steps);
* the VAE decoder's blocks while the pipeline decodes, and the image.

The initial noise is the request's (unpacked ``(1, 16, h, w)``; Flux's pipeline takes it packed,
by its own ``_pack_latents``), the scheduler the folder's FlowMatch Euler, so both sides start alike.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lora_parity.errors import LoraParityError
from lora_parity.sides.memory import free_memory, peak_rss_bytes, reset_peak_rss
from lora_parity.sides.request import SideRequest, SideResult

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
#: point-name patterns per component (diffusers module names, ``text_model.`` dropped)
TEXT_PATTERNS = (r"(text_model\.)?embeddings", r"(text_model\.)?encoder\.layers\.\d+", r"(text_model\.)?final_layer_norm",
                 r"shared", r"encoder\.embed_tokens", r"encoder\.block\.\d+", r"encoder\.final_layer_norm")
#: modules whose output is the pair (text stream, image stream)
TWO_STREAMS = re.compile(r"(single_)?transformer_blocks\.\d+")
TRANSFORMER_PATTERNS = (r"pos_embed", r"x_embedder", r"context_embedder", r"time_text_embed",
                        r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+", r"norm_out", r"proj_out")
VAE_PATTERNS = (r"decoder\.conv_in", r"decoder\.mid_block", r"decoder\.up_blocks\.\d+", r"decoder\.conv_out")


@dataclass(frozen=True)
class FlowLib:
    """What differs between diffusers (torch) and mindone.diffusers (MindSpore)."""

    name: str
    library: Any                                  # diffusers / mindone.diffusers
    modules: Callable[[Any], Iterator]            # root -> (name, submodule) pairs
    register_hook: Callable[[Any, Callable], Any]  # (module, hook(module, args, output)) -> handle
    is_tensor: Callable[[Any], bool]
    to_numpy: Callable[[Any], np.ndarray]         # float64
    tensor: Callable[[np.ndarray, str], Any]      # numpy -> tensor of the run's dtype
    no_grad: Callable[[], Any]
    load_pipeline: Callable[[SideRequest, Any], Any]
    load_lora: Callable[[Any, Path], list]        # -> file keys that landed (raises if any did not)


def point_name(component: str, module: str) -> str:
    """The point's name: ``text_model.`` dropped, T5's shared embedding under the encoder's name for it
    (MindSpore lists a shared cell once, by its first name)."""
    module = "encoder.embed_tokens" if module == "shared" else module.replace("text_model.", "")
    return f"{component}.{module}"


@contextlib.contextmanager
def hooked(lib: FlowLib, root, component: str, patterns) -> Iterator[dict[str, np.ndarray]]:
    """Forward hooks on ``root``'s modules matching ``patterns``; tuple outputs of two streams give
    ``name`` (image stream, the last) and ``name.context`` (text stream, the first)."""
    regexes = [re.compile(p) for p in patterns]
    out: dict[str, np.ndarray] = {}
    handles = []

    def put(key, value):
        name, k = key, 0
        while name in out:
            k += 1
            name = f"{key}#{k}"
        out[name] = lib.to_numpy(value)

    def make(key, two_streams: bool):
        def hook(_mod, _args, output):
            if isinstance(output, dict):
                output = list(output.values())
            if isinstance(output, (tuple, list)):
                tensors = [o for o in output if lib.is_tensor(o)]
                if two_streams and len(output) == 2 and lib.is_tensor(output[1]):
                    put(key, output[1])
                    if output[0] is not None:
                        put(key + ".context", output[0])
                elif tensors:
                    put(key, tensors[0])
            elif lib.is_tensor(output):
                put(key, output)
        return hook

    try:
        for name, sub in lib.modules(root):
            if name and any(r.fullmatch(name) for r in regexes):
                handles.append(lib.register_hook(sub, make(point_name(component, name),
                                                           bool(TWO_STREAMS.fullmatch(name)))))
        if not handles:
            raise LoraParityError(f"{lib.name}'s {type(root).__name__} has none of the expected blocks")
        yield out
    finally:
        for h in handles:
            h.remove()


def text_components(pipe) -> list[str]:
    return [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, c, None) is not None]


def capture_flow(req: SideRequest, lib: FlowLib, meta: dict) -> SideResult:
    """Run ``lib``'s SD3 / Flux pipeline for ``req``: layers, conditioning, steps, image."""
    reset_peak_rss()
    t_start = time.perf_counter()
    result = SideResult(meta={**meta, "seconds": {}})
    t0 = time.perf_counter()
    pipe = lib.load_pipeline(req, lib.library)
    flux = type(pipe).__name__ == "FluxPipeline"
    result.meta["pipeline"] = type(pipe).__name__
    landed = lib.load_lora(pipe, Path(req.lora)) if req.lora else []
    result.meta["lora_tensors_loaded"] = len(landed)
    result.meta["seconds"]["load"] = time.perf_counter() - t0

    # ---- text encoders, through the pipeline's own encode_prompt
    t0 = time.perf_counter()
    cfg_on = not flux and req.guidance > 1.0
    seq = int(req.max_sequence_length or 256)
    with contextlib.ExitStack() as stack:
        got = [stack.enter_context(hooked(lib, getattr(pipe, c), c, TEXT_PATTERNS)) for c in text_components(pipe)]
        with lib.no_grad():
            if flux:
                embeds, pooled, _ids = pipe.encode_prompt(req.prompt, prompt_2=None, max_sequence_length=seq)
                gen = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            else:
                embeds, neg, pooled, npool = pipe.encode_prompt(
                    req.prompt, None, None, do_classifier_free_guidance=cfg_on, max_sequence_length=seq)
                gen = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                if cfg_on:
                    gen.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=npool)
    if req.activations:
        for g in got:
            result.acts.update(g)
        for k, v in gen.items():
            result.acts[f"conditioning.{k}"] = lib.to_numpy(v)
    result.meta["seconds"]["text_encoders"] = time.perf_counter() - t0

    # ---- the pipeline's own denoising loop and decode, transformer and VAE hooked
    t0 = time.perf_counter()
    latents = np.ascontiguousarray(req.arrays["latents"], dtype=np.float32)
    factor = _vae_scale_factor(pipe)
    h, w = latents.shape[-2] * factor, latents.shape[-1] * factor
    x = lib.tensor(latents, req.dtype)
    if flux:
        b, c, lh, lw = latents.shape
        x = pipe._pack_latents(x, b, c, lh, lw)
    ends: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        ends.append(time.perf_counter())
        return kwargs

    kwargs = dict(gen, latents=x, num_inference_steps=int(req.steps or 1), height=h, width=w,
                  guidance_scale=float(req.guidance), output_type="np", callback_on_step_end=on_step_end)
    with contextlib.ExitStack() as stack:
        tr = stack.enter_context(hooked(lib, pipe.transformer, "transformer", TRANSFORMER_PATTERNS)) \
            if req.activations else {}
        with lib.no_grad():
            image = pipe(**kwargs)[0]
    result.acts.update(tr)
    if req.activations:  # the decoder on the request's latents (as SDXL's): its own error, not the loop's
        cfg = pipe.vae.config
        z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with hooked(lib, pipe.vae, "vae", VAE_PATTERNS) as vae, lib.no_grad():
            pipe.vae.decode(lib.tensor(z.astype(np.float32), req.dtype), return_dict=False)
        result.acts.update(vae)
    if req.steps is not None:
        result.images["image"] = np.asarray(image[0], dtype=np.float32)
    result.meta["timesteps_run"] = [float(t) for t in np.asarray(lib.to_numpy(pipe.scheduler.timesteps)).ravel()]
    result.meta["seconds_per_step"] = ((ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else
                                       (ends[-1] - t0 if ends else float("nan")))
    result.meta["seconds"]["transformer_and_vae"] = time.perf_counter() - t0
    del pipe
    free_memory()
    result.meta["seconds"]["total"] = time.perf_counter() - t_start
    result.meta["peak_rss_bytes"] = peak_rss_bytes()
    return result


def _vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def flow_pipeline_class(pipeline_dir: Path, library) -> type:
    import json

    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    name = index.get("_class_name")
    if name not in FLOW_PIPELINES:
        raise LoraParityError(f"pipeline class {name!r} is not SD3 / Flux ({', '.join(FLOW_PIPELINES)})",
                              path=Path(pipeline_dir) / "model_index.json")
    return getattr(library, name)


def is_flow_folder(pipeline_dir: str | Path) -> bool:
    import json

    index = Path(pipeline_dir) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") in FLOW_PIPELINES
    except (OSError, ValueError):
        return False


def load_components(req: SideRequest, library, models, dtype_kw: dict, check) -> dict:
    """Every component of the folder's ``model_index.json`` by its own class: models from ``library``
    (diffusers side) or ``models`` (transformers side) with their loading info checked, tokenizers
    from transformers, the scheduler from ``library``."""
    import json

    import transformers

    folder = Path(req.pipeline_dir)
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for comp, entry in index.items():
        if comp.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        lib_name, cls_name = entry
        kw = {"subfolder": comp, "local_files_only": True}
        if comp.startswith("tokenizer"):
            out[comp] = getattr(transformers, cls_name).from_pretrained(str(folder), **kw)
            continue
        if comp == "scheduler":
            out[comp] = getattr(library, cls_name).from_pretrained(str(folder), **kw)
            continue
        cls = getattr(library if lib_name == "diffusers" else models, cls_name)
        if req.variant:
            kw["variant"] = req.variant
        try:
            model, info = cls.from_pretrained(str(folder), **kw, **dtype_kw, output_loading_info=True)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise LoraParityError(f"cannot load {comp}: {str(exc).splitlines()[0]}", path=folder) from None
        check(folder / comp, info)
        out[comp] = model
    return out


def torch_lib() -> FlowLib:
    import diffusers
    import torch
    import transformers

    from lora_parity.backends.diffusers.capture import check_loading_info
    from lora_parity.backends.diffusers.view import load_lora_checked

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def load_pipeline(req, library):
        cls = flow_pipeline_class(Path(req.pipeline_dir), library)
        comps = load_components(req, library, transformers, {"torch_dtype": dtypes[req.dtype]}, check_loading_info)
        for m in comps.values():
            if isinstance(m, torch.nn.Module):
                m.eval()
        pipe = cls(**comps)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return FlowLib(
        name="diffusers", library=diffusers, modules=lambda root: root.named_modules(),
        register_hook=lambda m, hook: m.register_forward_hook(hook),
        is_tensor=lambda x: isinstance(x, torch.Tensor),
        to_numpy=lambda t: t.detach().to("cpu", torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t),
        tensor=lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dtypes[dt]),
        no_grad=torch.no_grad, load_pipeline=load_pipeline,
        load_lora=lambda pipe, path: list(load_lora_checked(pipe, path).loaded))


def mindone_lib() -> FlowLib:
    import mindspore as ms
    from mindone import diffusers as md
    from mindone import transformers as mt

    from lora_parity.backends.diffusers.capture import check_loading_info
    from lora_parity.backends.mindone.capture import ADAPTER, _check_peft, check_lora_landed

    dtypes = {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}

    def load_pipeline(req, library):
        cls = flow_pipeline_class(Path(req.pipeline_dir), library)
        comps = load_components(req, library, mt, {"mindspore_dtype": dtypes[req.dtype]}, check_loading_info)
        for m in comps.values():
            if isinstance(m, ms.nn.Cell):
                m.set_train(False)
        pipe = cls(**comps)
        pipe.set_progress_bar_config(disable=True)
        return pipe

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
        tensor=lambda a, dt: ms.Tensor(np.ascontiguousarray(a)).astype(dtypes[dt]),
        no_grad=contextlib.nullcontext, load_pipeline=load_pipeline, load_lora=load_lora)
