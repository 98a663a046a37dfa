"""The MindSpore side of a capture: our SGM-layout port, one component at a time.

Cells are built with lazy (unallocated) parameters, then filled tensor by tensor from a
weight source (a base SPEC's :class:`~lora_parity.bases.SgmWeights`, or an explicit
MindSpore ``.ckpt``), so the model is never held twice.  Text encoders run and are
freed before the UNet is built, and the UNet before the VAE decoder: peak memory is the
largest component, not the sum.  The MindONE LoRA is injected unmerged (scale alpha/r)
or merged (``merge``), as MindONE runs it.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np

from lora_parity.parity.align import timestep_suffix
from lora_parity.backends.port.view import MindSporeBackend
from lora_parity.errors import LoraParityError
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.sides.memory import free_memory, peak_rss_bytes, reset_peak_rss, rss_bytes
from lora_parity.sides.request import SideRequest, SideResult



class CkptWeights:
    """A MindSpore ``.ckpt`` with SGM names (read whole: explicit base pairs are the user's own files)."""

    def __init__(self, path: Path):
        from lora_parity.convert import ckpt_io

        self.path = Path(path)
        self._tensors = ckpt_io.read_ckpt(self.path)

    def names(self) -> set[str]:
        return set(self._tensors)

    def load(self, names):
        for name in names:
            t = self._tensors.get(name)
            if t is None:
                raise LoraParityError("missing from the MindSpore base checkpoint", path=self.path, key=name)
            yield name, t.to_float("float32")


class _Loader:
    """Fills one cell's parameters from the source, then LoRA, merge and dtype as requested."""

    def __init__(self, req: SideRequest, layout):
        import mindspore as ms

        self.req = req
        self.layout = layout
        if req.base_spec:
            from lora_parity.bases import resolve_base

            self.source = resolve_base(req.base_spec, variant=req.variant,
                                       cache=Path(req.cache) if req.cache else None).sgm_weights()
            self.where = req.base_spec
        elif req.ms_ckpt:
            self.source = CkptWeights(Path(req.ms_ckpt))
            self.where = req.ms_ckpt
        else:
            raise LoraParityError("the MindSpore side needs a base (--base or --ms-base)")
        self.lora, self.alphas = _lora_tensors(req, layout)
        self.injected: list[str] = []
        self.ms_dtype = {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}[req.dtype]

    def fill(self, cell, *, cast: bool = True):
        import mindspore as ms

        from lora_parity.backends.port.lora import inject_lora, merge_lora
        from lora_parity.backends.port.model import cast_params

        from lora_parity.backends.port.model import _ALIASES as MISSPELT  # MindONE checkpoint spelling -> ours

        spelt_as = {name: alias for alias, name in MISSPELT.items()}
        own = {p.name: p for p in cell.get_parameters()}
        available = self.source.names()
        wanted = {}
        for name in own:
            if name in available:
                wanted[name] = name
            elif spelt_as.get(name) in available:
                wanted[spelt_as[name]] = name
        missing = sorted(set(own) - set(wanted.values()))
        if missing:
            raise LoraParityError(f"base weights lack {len(missing)} parameter(s) of the model",
                                  path=self.where, key=missing[0])
        for src_name, arr in self.source.load(wanted):
            p = own[wanted[src_name]]
            if tuple(arr.shape) != tuple(p.shape) and arr.size == 1 == int(np.prod(p.shape)):
                arr = arr.reshape(p.shape)  # scalars saved as [1] (e.g. OpenCLIP logit_scale)
            if tuple(arr.shape) != tuple(p.shape):
                raise LoraParityError(f"shape {list(arr.shape)} does not fit the model's {list(p.shape)}",
                                      path=self.where, key=src_name)
            # from_numpy shares the float32 array (a fresh one per parameter) where Tensor() would copy it:
            # measured, the full-size UNet's 10 GB copied once more cost ~13 s of a 34 s load
            p.set_data(ms.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
        if self.lora:
            done = inject_lora(cell, self.lora, self.alphas)
            self.injected += list(done.wrapped)
            if self.req.merge:
                merge_lora(cell)
        if cast and self.req.dtype != "F32":
            cast_params(cell, self.ms_dtype)
        if self.req.graph:
            from lora_parity.backends.port.graph import compile_for_graph

            compile_for_graph(cell)
        return cell


class _InDtype:
    """The UNet called in a low precision with the sampler's float32 tensors: inputs cast down,
    the noise prediction cast back up, so the Euler update runs in float32 as diffusers'
    scheduler does (it upcasts the sample for the step)."""

    def __init__(self, unet, dtype):
        self.unet, self.dtype = unet, dtype

    def __call__(self, x, t, context, y):
        import mindspore as ms

        out = self.unet(x.astype(self.dtype), t, context.astype(self.dtype), _cast(y, self.dtype))
        return out.astype(ms.float32)


def _cast(y, dtype):
    """The SDXL vector in ``dtype``; SD 1.x / 2.x have none (None)."""
    return None if y is None else y.astype(dtype)


def _lora_tensors(req: SideRequest, layout):
    if not req.lora:
        return {}, {}
    from lora_parity.convert.converter import load_lora
    from lora_parity.convert.formats import tensors_for

    lora = load_lora(Path(req.lora), layout=layout, alpha=req.alpha, ema=req.ema, lora_scale=req.lora_scale)
    if lora.source_format != "ms":
        raise LoraParityError("--ms-lora must be a MindONE LoRA (.ckpt)", path=req.lora)
    tensors = {k: t.to_float("float32") for k, t in tensors_for(lora, "ms")[0].items()}
    return tensors, {p.module.sgm: p.alpha for p in lora.pairs.values()}


def _te_configs(pdir: Path, layout) -> list[dict | None]:
    out = []
    for te in layout.text_encoders:
        sub = "text_encoder" if te.style in ("hf", "ldm") else "text_encoder_2"
        f = pdir / sub / "config.json"
        out.append(json.loads(f.read_text()) if f.is_file() else None)
    return out


def capture_ms(req: SideRequest) -> SideResult:
    """Run the MindSpore port for ``req``; activations by SGM names (SDXL: ``gm``'s; SD 1.x / 2.x: MindONE's
    LDM names, the same UNet blocks and the ``cond_stage_model.transformer.`` text encoder)."""
    import mindspore as ms
    from mindspore import Tensor, ops

    from lora_parity.backends.port.layers import capture_activations, replay_activations
    from lora_parity.backends.port.runtime import configure_cpu
    from lora_parity.backends.port.text import build_text_encoder
    from lora_parity.backends.port.unet import UNetModel
    from lora_parity.backends.port.vae import VAEDecoder
    from lora_parity.device import use_device
    from lora_parity.sampling import EulerSchedule, denormalize

    from lora_parity.backends.port import numerics

    reset_peak_rss()
    t_start = time.perf_counter()
    try:
        numerics.set_numerics(numerics.parse(req.port_numerics) if req.port_numerics else None)
    except ValueError as exc:
        raise LoraParityError(f"--port-numerics: {exc}") from None
    settings = use_device(req.device)
    settings["port_numerics"] = numerics.describe()
    ok, why = MindSporeBackend.supports(req.dtype, req.device)
    if not ok:
        raise LoraParityError(f"--dtype {req.dtype}: {why}")
    configure_cpu()
    pdir = Path(req.pipeline_dir)
    layout = layout_from_pipeline_dir(pdir)
    loader = _Loader(req, layout)
    x_dtype = loader.ms_dtype
    replay = _Replay(req, bool(loader.lora)) if req.activations and req.replay and req.refs() else None
    result = SideResult(meta={"side": "ms", "dtype": req.dtype, "backend": "port", "mindspore_settings": settings,
                              "versions": {"mindspore": ms.__version__}, "seconds": {}})
    latents = req.arrays["latents"]
    refiner = req.aesthetic is not None
    sdxl = layout.family == "sdxl"  # SD 1.x / 2.x (MindONE's LDM): the context only, no vector y
    dim = layout.unet.addition_time_embed_dim
    orig, crop, target = (tuple(int(v) for v in p) for p in req.size_cond)
    cfg_on = req.steps is not None and req.guidance > 1.0

    # ---- phase 1: text encoders -> context, y (and the negative branch for the refiner)
    t0 = time.perf_counter()
    encoders = [loader.fill(build_text_encoder(te, cfg)) for te, cfg in zip(layout.text_encoders,
                                                                             _te_configs(pdir, layout))]
    if "input_ids_2" not in req.arrays:  # run alone (``infer``): the folder's own tokenizers
        from lora_parity.sides.tokens import token_ids

        req.arrays.update(token_ids(pdir, req.prompt, negative=cfg_on and refiner))
    for k in ("input_ids", "input_ids_2"):  # what this capture ran on (a bundle's judge checks them)
        if k in req.arrays:
            result.acts[f"_inputs.{k}"] = np.asarray(req.arrays[k], np.int64)
    ids = [req.arrays[k] for k in ("input_ids", "input_ids_2") if k in req.arrays][-len(encoders):]
    from lora_parity.backends.port.unet import sdxl_vector

    pooled_seen = {}

    def condition(id_list, score):
        hidden, pooled = [], None
        for enc, i in zip(encoders, id_list):
            h, pooled = enc(Tensor(np.asarray(i, np.int64)))
            hidden.append(h)
        pooled_seen.setdefault("first", pooled)
        context = ops.concat(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
        if not sdxl:
            return context, None
        extra = {"aesthetic_score": score} if refiner else {}
        return context, sdxl_vector(pooled, orig, crop, target, dim, **extra)

    with capture_activations(*encoders) as acts:
        context, y = condition(ids, req.aesthetic[0] if refiner else None)
    if req.activations and not req.replay_only:
        result.acts.update(acts)
        result.acts["conditioner.context"] = context.asnumpy()
        if y is not None:
            result.acts["conditioner.vector"] = y.asnumpy()
    if replay is not None:
        def text_pass():
            out = {}
            with replay_activations(replay.ref, *encoders) as out:
                _, v = condition(ids, req.aesthetic[0] if refiner else None)
            if v is not None:  # the context only concatenates replayed outputs: chained
                out["conditioner.vector"] = v.asnumpy()
            return out
        replay.run(result, encoders, text_pass)
    negative = None
    if cfg_on and refiner:
        negative = condition([req.arrays["negative_input_ids_2"]], req.aesthetic[1])
    elif cfg_on and not sdxl:  # StableDiffusionPipeline encodes the negative prompt "" (no zeroed branch)
        from lora_parity.sides.tokens import token_ids

        negative = condition([token_ids(pdir, "")["input_ids"]], None)
    del encoders
    free_memory()
    result.meta["seconds"]["text_encoders"] = time.perf_counter() - t0
    result.meta["rss_after_bytes"] = {"text_encoders": rss_bytes(), "peak_so_far": peak_rss_bytes()}

    # ---- phase 2: UNet forwards (one per timestep), then the denoising loop
    t0 = time.perf_counter()
    unet = loader.fill(UNetModel(layout.unet, family=layout.family))
    x = Tensor(latents, x_dtype)
    forward_s = []
    for t in (req.timesteps if req.activations and not req.replay_only else ()):
        with capture_activations(unet) as acts:
            t1 = time.perf_counter()
            unet(x, Tensor(np.full((latents.shape[0],), t, np.float32)), context.astype(x_dtype), _cast(y, x_dtype))
            forward_s.append(time.perf_counter() - t1)
        suffix = timestep_suffix(t, req.timesteps)
        result.acts.update({k + suffix: v for k, v in acts.items()})
    result.meta["unet_forward_seconds"] = forward_s
    final = None
    if req.steps is not None:
        from lora_parity.backends.port.sampler import denoise

        schedule = EulerSchedule.from_pipeline_dir(pdir, int(req.steps))
        model = unet if req.dtype == "F32" else _InDtype(unet, x_dtype)
        final, per_step = denoise(model, np.asarray(latents, np.float32), context, y, schedule, float(req.guidance),
                                  dim, req.progress, negative=negative, scale_initial_noise=not refiner)
        result.meta["seconds_per_step"] = per_step
        del model  # the last reference to the UNet besides ``unet``: both must go before the VAE is built
    if replay is not None:
        def unet_pass():
            out = {}
            for t in req.timesteps:
                suffix = timestep_suffix(t, req.timesteps)
                ref = replay.at(suffix)
                with replay_activations(ref, unet) as acts:
                    unet(x, Tensor(np.full((latents.shape[0],), t, np.float32)),
                         replay.tensor(ref, "conditioner.context", context).astype(x_dtype),
                         _cast(replay.tensor(ref, "conditioner.vector", y) if sdxl else None, x_dtype))
                out.update({k + suffix: v for k, v in acts.items()})
            return out
        replay.run(result, [unet], unet_pass)
    del unet
    free_memory()
    result.meta["seconds"]["unet"] = time.perf_counter() - t0
    result.meta["rss_after_bytes"].update(unet=rss_bytes(), peak_so_far_unet=peak_rss_bytes())

    # ---- phase 3: VAE decoder (a float16 VAE decodes the image in float32 when its config asks, as diffusers)
    t0 = time.perf_counter()
    vae_cfg = json.loads((pdir / "vae" / "config.json").read_text())
    vae = loader.fill(VAEDecoder.from_diffusers_config(vae_cfg), cast=False)
    upcast = req.dtype == "F16" and vae_cfg.get("force_upcast", True)
    if req.dtype != "F32":
        from lora_parity.backends.port.model import cast_params

        cast_params(vae, loader.ms_dtype)
    if req.activations and not req.replay_only:
        with capture_activations(vae) as acts:
            vae(Tensor(latents, x_dtype))
        result.acts.update(acts)
    if replay is not None:
        def vae_pass():
            with replay_activations(replay.ref, vae) as acts:
                vae(Tensor(latents, x_dtype))
            return acts
        replay.run(result, [vae], vae_pass)
    if final is not None:
        if upcast:
            from lora_parity.backends.port.model import cast_params

            cast_params(vae, ms.float32)
        z = final.astype(ms.float32 if upcast or req.dtype == "F32" else x_dtype)
        result.images["image"] = denormalize(vae(z).asnumpy())[0]
    del vae
    free_memory()
    result.meta["seconds"]["vae"] = time.perf_counter() - t0
    result.meta["lora_layers_injected"] = len(loader.injected)
    result.meta["seconds"]["total"] = time.perf_counter() - t_start
    result.meta["peak_rss_bytes"] = peak_rss_bytes()
    from lora_parity.sides.environment import port_environment

    result.meta["numerics_env"] = port_environment(req, settings)
    return result


class _Replay:
    """The port's replay passes: each component's aligned blocks on the reference's outputs (see
    ``layers.replay_activations``), recorded under ``LOCAL``, and again with the LoRA off under ``NOLORA``."""

    def __init__(self, req: SideRequest, has_lora: bool):
        self.ref = req.refs()
        self.has_lora = has_lora
        self.seconds = 0.0

    def at(self, suffix: str) -> dict:
        """The references of one timestep, by the names the UNet records (without the ``@tT`` suffix)."""
        if not suffix:
            return self.ref
        return {k[:-len(suffix)]: v for k, v in self.ref.items() if k.endswith(suffix)} | {
            k: v for k, v in self.ref.items() if k.startswith("conditioner.")}

    @staticmethod
    def tensor(ref: dict, name: str, own):
        from mindspore import Tensor

        return Tensor(np.ascontiguousarray(ref[name], np.float32)) if name in ref else own

    def run(self, result: SideResult, cells, one_pass) -> None:
        from lora_parity.backends.port.lora import carries_lora, lora_disabled
        from lora_parity.parity.verdict import LOCAL, NOLORA

        t0 = time.perf_counter()
        result.acts.update({LOCAL + k: v for k, v in one_pass().items() if k in self.ref})
        # a component without a LoRA (the VAE): the LoRA-off pass would be the pass just run, op for op, so it is
        # not run again (as the PyTorch side; at full size one 256x256 decode, ~7 s)
        if self.has_lora and any(carries_lora(c) for c in cells):
            with contextlib.ExitStack() as stack:
                for c in cells:
                    stack.enter_context(lora_disabled(c))
                result.acts.update({NOLORA + k: v for k, v in one_pass().items() if k in self.ref})
        self.seconds += time.perf_counter() - t0
        result.meta.setdefault("seconds", {})["replay"] = self.seconds
