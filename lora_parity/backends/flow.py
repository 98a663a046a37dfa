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
* the VAE decoder's blocks on the request's latents (as SDXL's: the decoder's own error, not the loop's),
  and the image the pipeline decodes.

Then the replay (``_Run.replay``): the same passes with every point handed the reference's value, and once
more with the adapters off (the LoRA's own effect).

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
    tensor: Callable[..., Any]                    # (numpy, dtype name | None, like=tensor) -> tensor
    no_grad: Callable[[], Any]
    load_pipeline: Callable[[SideRequest, Any], Any]
    load_lora: Callable[[Any, Path], list]        # -> file keys that landed (raises if any did not)
    framework: Callable[[], Any]                  # the replay Framework (adapters on / off)
    reduced_attention: Callable[..., list] | None = None  # (dtype, **models) -> phrases (mindone)


def point_name(component: str, module: str) -> str:
    """The point's name: ``text_model.`` dropped, T5's shared embedding under the encoder's name for it
    (MindSpore lists a shared cell once, by its first name)."""
    module = "encoder.embed_tokens" if module == "shared" else module.replace("text_model.", "")
    return f"{component}.{module}"


@contextlib.contextmanager
def hooked(lib: FlowLib, root, component: str, patterns, ref: dict | None = None
           ) -> Iterator[dict[str, np.ndarray]]:
    """Forward hooks on ``root``'s modules matching ``patterns``; tuple outputs of two streams give
    ``name`` (image stream, the last) and ``name.context`` (text stream, the first).  A module that
    runs again is recorded as ``name#1``, ``name#2`` ... (the denoising steps).

    With ``ref`` (replay, see :mod:`lora_parity.backends.replay`): each recorded output is handed on as
    the reference's value of the same name instead, so the next module starts from the reference's
    inputs and what is recorded is what each module alone adds."""
    regexes = [re.compile(p) for p in patterns]
    out: dict[str, np.ndarray] = {}
    calls: dict[str, int] = {}
    handles = []

    def put(name, value):
        out[name] = lib.to_numpy(value)
        if ref is not None and name in ref and tuple(ref[name].shape) == tuple(value.shape):
            return lib.tensor(np.asarray(ref[name], np.float32), None, like=value)
        return None

    def make(key, two_streams: bool):
        def hook(_mod, _args, output):
            n = calls.get(key, 0)
            calls[key] = n + 1
            sfx = f"#{n}" if n else ""
            if isinstance(output, (tuple, list)) and not isinstance(output, dict):
                items = list(output)
                if two_streams and len(items) == 2 and lib.is_tensor(items[1]):
                    new1 = put(key + sfx, items[1])
                    new0 = put(key + ".context" + sfx, items[0]) if items[0] is not None else None
                    if new0 is None and new1 is None:
                        return None
                    return type(output)([items[0] if new0 is None else new0, items[1] if new1 is None else new1])
                first = next((i for i, o in enumerate(items) if lib.is_tensor(o)), None)
                if first is None:
                    return None
                new = put(key + sfx, items[first])
                if new is None:
                    return None
                items[first] = new
                return type(output)(items)
            if lib.is_tensor(output):
                return put(key + sfx, output)
            if isinstance(output, dict):  # a ModelOutput: its first tensor
                k0 = next((k for k, v in output.items() if lib.is_tensor(v)), None)
                if k0 is not None:
                    new = put(key + sfx, output[k0])
                    if new is not None:
                        output[k0] = new
                        return output
            return None
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
    """Run ``lib``'s SD3 / Flux pipeline for ``req``: layers, conditioning, steps, image; then the replay."""
    reset_peak_rss()
    t_start = time.perf_counter()
    result = SideResult(meta={**meta, "seconds": {}})
    t0 = time.perf_counter()
    run = _Run(req, lib, lib.load_pipeline(req, lib.library))
    result.meta["pipeline"] = type(run.pipe).__name__
    if lib.reduced_attention is not None:  # attention computed in float16 in a float32 run (recorded)
        result.meta["reduced_attention"] = lib.reduced_attention(req.dtype, transformer=run.pipe.transformer)
    landed = lib.load_lora(run.pipe, Path(req.lora)) if req.lora else []
    result.meta["lora_tensors_loaded"] = len(landed)
    result.meta["seconds"]["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text, gen = run.encode()
    result.meta["seconds"]["text_encoders"] = time.perf_counter() - t0
    if not req.replay_only:  # replay-only (a kept capture replayed on new references): no chained pass, no image
        t0 = time.perf_counter()
        tr, image, ends = run.denoise(gen, output_type="np" if req.steps is not None else "latent")
        result.meta["seconds"]["transformer"] = time.perf_counter() - t0
        result.meta["seconds_per_step"] = ((ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else
                                           (ends[-1] - t0 if ends else float("nan")))
        result.meta["timesteps_run"] = [float(t) for t in
                                        np.asarray(lib.to_numpy(run.pipe.scheduler.timesteps)).ravel()]
        if req.steps is not None:
            result.images["image"] = np.asarray(image[0], dtype=np.float32)
    if req.activations and not req.replay_only:
        result.acts.update(text)
        result.acts.update({f"conditioning.{k}": lib.to_numpy(v) for k, v in gen.items()})
        result.acts.update(tr)
        result.acts.update(run.decode())
    if req.activations and req.replay:
        t0 = time.perf_counter()
        run.replay(result, gen)
        result.meta["seconds"]["replay"] = time.perf_counter() - t0
    del run
    free_memory()
    result.meta["seconds"]["total"] = time.perf_counter() - t_start
    result.meta["peak_rss_bytes"] = peak_rss_bytes()
    return result


class _Run:
    """One side's pipeline and the passes over it: chained (recorded) and replayed (substituted)."""

    def __init__(self, req: SideRequest, lib: FlowLib, pipe):
        self.req, self.lib, self.pipe = req, lib, pipe
        self.flux = type(pipe).__name__ == "FluxPipeline"
        self.cfg_on = not self.flux and req.guidance > 1.0
        self.latents = np.ascontiguousarray(req.arrays["latents"], dtype=np.float32)

    def encode(self, ref: dict | None = None):
        """The pipeline's own ``encode_prompt`` with every text encoder hooked: (layers, conditioning)."""
        pipe, lib, req = self.pipe, self.lib, self.req
        seq = int(req.max_sequence_length or 256)
        with contextlib.ExitStack() as stack:
            got = [stack.enter_context(hooked(lib, getattr(pipe, c), c, TEXT_PATTERNS, ref))
                   for c in text_components(pipe)]
            with lib.no_grad():
                if self.flux:
                    embeds, pooled, _ids = pipe.encode_prompt(req.prompt, prompt_2=None, max_sequence_length=seq)
                    gen = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                else:
                    embeds, neg, pooled, npool = pipe.encode_prompt(
                        req.prompt, None, None, do_classifier_free_guidance=self.cfg_on, max_sequence_length=seq)
                    gen = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                    if self.cfg_on:
                        gen.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=npool)
        return {k: v for g in got for k, v in g.items()}, gen

    def denoise(self, gen: dict, *, output_type: str, ref: dict | None = None):
        """The pipeline's own loop from the request's noise, the transformer hooked: (layers, output, step ends)."""
        pipe, lib, req = self.pipe, self.lib, self.req
        factor = _vae_scale_factor(pipe)
        h, w = self.latents.shape[-2] * factor, self.latents.shape[-1] * factor
        x = lib.tensor(self.latents, req.dtype)
        if self.flux:
            b, c, lh, lw = self.latents.shape
            x = pipe._pack_latents(x, b, c, lh, lw)
        ends: list[float] = []

        def on_step_end(_pipe, _i, _t, kwargs):
            ends.append(time.perf_counter())
            return kwargs

        kwargs = dict(gen, latents=x, num_inference_steps=int(req.steps or 1), height=h, width=w,
                      guidance_scale=float(req.guidance), output_type=output_type, callback_on_step_end=on_step_end)
        with hooked(lib, pipe.transformer, "transformer", TRANSFORMER_PATTERNS, ref) as tr, lib.no_grad():
            image = pipe(**kwargs)[0]
        return tr, image, ends

    def decode(self, ref: dict | None = None) -> dict:
        """The decoder on the request's latents (as SDXL's): its own error, not the loop's."""
        pipe, lib = self.pipe, self.lib
        cfg = pipe.vae.config
        z = self.latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with hooked(lib, pipe.vae, "vae", VAE_PATTERNS, ref) as vae, lib.no_grad():
            pipe.vae.decode(lib.tensor(z.astype(np.float32), self.req.dtype), return_dict=False)
        return vae

    def replay(self, result: SideResult, gen: dict) -> None:
        """Every aligned point again on the reference's values (``local/``), and without the LoRA
        (``nolora/``, the LoRA's own effect): the request's references (the MindSpore side, on PyTorch's
        fp32 run) or this side's own chained outputs (the reference side: its replay with the LoRA
        reproduces its chained run; without it, the effect the other side is judged against)."""
        from lora_parity.backends.replay import adapters_disabled
        from lora_parity.parity.verdict import LOCAL, NOLORA

        ref = self.req.refs() or {k: v for k, v in result.acts.items() if not k.startswith(("_", LOCAL, NOLORA))}
        lib = self.lib
        cond = {k: lib.tensor(np.asarray(ref[f"conditioning.{k}"], np.float32), None, like=v)
                if f"conditioning.{k}" in ref else v for k, v in gen.items()}

        def one_pass(with_vae: bool) -> dict:
            text, _ = self.encode(ref)
            tr, _, _ = self.denoise(cond, output_type="latent", ref=ref)
            out = {**text, **tr}
            if with_vae:
                out.update(self.decode(ref))
            return out

        result.acts.update({LOCAL + k: v for k, v in one_pass(True).items()})
        if self.req.lora:
            roots = [getattr(self.pipe, c) for c in text_components(self.pipe)] + [self.pipe.transformer]
            with adapters_disabled(lib.framework(), *roots):
                result.acts.update({NOLORA + k: v for k, v in one_pass(False).items()})


def _vae_scale_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def flow_pipeline_class(pipeline_dir: Path, library) -> type:
    import json

    from lora_parity.parity.align import FLOW_PIPELINE_FAMILIES

    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    name = index.get("_class_name")
    if name not in FLOW_PIPELINE_FAMILIES:
        raise LoraParityError(f"pipeline class {name!r} is not SD3 / Flux ({', '.join(FLOW_PIPELINE_FAMILIES)})",
                              path=Path(pipeline_dir) / "model_index.json")
    return getattr(library, name)


def is_flow_folder(pipeline_dir: str | Path) -> bool:
    from lora_parity.parity.align import is_flow_folder as by_index

    return by_index(pipeline_dir)


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


def build_pipeline(req: SideRequest, library, models, dtype_kw: dict, check, inference_mode) -> Any:
    """The folder's SD3 / Flux pipeline of ``library`` over freshly loaded, checked components, each put in
    inference mode (``inference_mode(component)``: torch's eval / MindSpore's set_train(False))."""
    cls = flow_pipeline_class(Path(req.pipeline_dir), library)
    comps = load_components(req, library, models, dtype_kw, check)
    for m in comps.values():
        inference_mode(m)
    pipe = cls(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe
