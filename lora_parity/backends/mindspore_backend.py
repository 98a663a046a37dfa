"""The MindSpore backend: SGM-layout SDXL cells, MindONE base weights and LoRA, captured per block.

Loads a base ``.ckpt`` (SGM names) with ``load_param_into_net`` semantics,
injects a MindONE LoRA unmerged (scale alpha/r, as MindONE runs it), and
records every block's output under its SGM name.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import LoraParityError
from ..layout import layout_from_pipeline_dir

class MindSporeBackend:
    name = "mindspore"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        try:
            import mindspore  # noqa: F401
        except ImportError:
            return False, "mindspore is not installed"
        return True, ""

    # MindSpore 2.10's CPU MatMul has no bfloat16 kernel ("Select CPU operator[MatMul] fail")
    CPU_DTYPES = ("F32", "F16")

    @classmethod
    def supports(cls, dtype: str) -> tuple[bool, str]:
        import mindspore as ms

        if ms.get_context("device_target") == "CPU" and dtype not in cls.CPU_DTYPES:
            return False, f"MindSpore {ms.__version__} on CPU has no {dtype} MatMul kernel"
        return True, ""

    def __init__(self, pipeline_dir: Path, ms_base: Path, ms_lora: Path | None = None, alpha: float | None = None,
                 *, dtype: str = "F32", merge: bool = False, graph: bool = False):
        ok, why = self.is_available()
        if not ok:
            raise LoraParityError(why)
        import mindspore as ms

        from .. import ckpt_io
        from .mindspore.lora import inject_lora
        from .mindspore.model import build_sdxl

        base = Path(pipeline_dir)
        self.pipeline_dir = base
        self.layout = layout_from_pipeline_dir(base)
        te_cfgs = tuple(json.loads((base / d / "config.json").read_text()) for d in ("text_encoder", "text_encoder_2")
                        if (base / d / "config.json").is_file())
        # graph mode: compiled on first call, bit-identical to PyNative; recording always runs PyNative
        self.comps = build_sdxl(self.layout, te_cfgs, json.loads((base / "vae" / "config.json").read_text()),
                                graph=graph)
        weights = ckpt_io.read_ckpt(ms_base)
        params = {k: ms.Parameter(ms.Tensor(t.to_float("float32")), name=k) for k, t in weights.items()}
        # the VAE encoder and MindONE's CLIP position_ids are not counted as unused by load()
        missing, unused = self.comps.load(params, strict=False)
        if missing or unused:
            raise LoraParityError(f"base weights do not fit the model: {len(missing)} missing, {len(unused)} unexpected",
                                  path=ms_base, key=(missing or unused)[0])
        if ms_lora is not None:
            from ..convert import load_lora
            from ..formats import tensors_for

            lora = load_lora(Path(ms_lora), layout=self.layout, alpha=alpha)
            if lora.source_format != "ms":
                raise LoraParityError("--ms-lora must be a MindONE LoRA (.ckpt)", path=ms_lora)
            tensors = {k: t.to_float("float32") for k, t in tensors_for(lora, "ms")[0].items()}
            alphas = {p.module.sgm: p.alpha for p in lora.pairs.values()}
            for cell in self.comps.cells():
                inject_lora(cell, tensors, alphas)
                if merge:
                    from .mindspore.lora import merge_lora

                    merge_lora(cell)
        self.dtype = dtype
        if dtype != "F32":
            from .mindspore.model import cast_params

            ok, why = self.supports(dtype)
            if not ok:
                raise LoraParityError(why)
            target = {"F16": ms.float16, "BF16": ms.bfloat16}[dtype]
            for cell in self.comps.cells():
                cast_params(cell, target)

    def activations(self, ids1: np.ndarray, ids2: np.ndarray, latents: np.ndarray, timestep: float,
                    size_cond) -> tuple[dict[str, np.ndarray], float]:
        """Every recorded block (SGM names) plus ``conditioner.context``/``vector``; and UNet seconds."""
        import mindspore as ms

        from .mindspore.layers import capture_activations

        orig, crop, target = size_cond
        comps = self.comps
        with capture_activations(*comps.cells()) as acts:
            ids = [ms.Tensor(ids1), ms.Tensor(ids2)][-len(comps.text_encoders):]
            context, y = comps.conditioning(ids, orig, crop, target)
            acts["conditioner.context"] = context.asnumpy()
            acts["conditioner.vector"] = y.asnumpy()
            x = ms.Tensor(latents, {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}[self.dtype])
            t0 = time.perf_counter()
            comps.unet(x, ms.Tensor(np.full((latents.shape[0],), timestep, np.float32)), context, y)
            seconds = time.perf_counter() - t0
            if comps.vae is not None:
                comps.vae(x)
        return acts, seconds

    def generate_float(self, ids1: np.ndarray, ids2: np.ndarray, latents: np.ndarray, steps: int,
                       guidance: float, size_cond=((32, 32), (0, 0), (32, 32)), progress: bool = False,
                       *, scheduler=None) -> tuple[np.ndarray, float]:
        """Text-to-image as diffusers' SDXL pipeline runs it (Euler, CFG with zero negative embeddings).

        ``latents``: the initial noise (N, 4, h, w), scaled by ``init_noise_sigma`` here;
        ``size_cond``: (original size, crop top-left, target size) for the time ids;
        ``scheduler``: the diffusers pipeline folder, or a ``scheduler_config.json`` dict
        (default: ``self.pipeline_dir`` when the constructor recorded it).
        Returns the first image as float32 (H, W, 3) in [0, 1] and the seconds per denoising step.
        See :mod:`.mindspore.sampler`.
        """
        from ..sampling import EulerSchedule
        from .mindspore.sampler import generate_float

        source = scheduler if scheduler is not None else getattr(self, "pipeline_dir", None)
        if source is None:
            raise LoraParityError("generate_float needs scheduler= (pipeline folder or scheduler config)")
        if isinstance(source, dict):
            schedule = EulerSchedule.from_config(source, int(steps))
        else:
            schedule = EulerSchedule.from_pipeline_dir(Path(source), int(steps))
        ids = [ids1, ids2][-len(self.comps.text_encoders):]
        return generate_float(self.comps, ids, np.asarray(latents, np.float32), schedule, float(guidance),
                              size_cond, progress)
