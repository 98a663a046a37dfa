"""Synthetic captures for the judge: a configs-only tiny SDXL folder and two SideResults over its alignment.

The judge (``compare.judge``, ``compare.compare_bundles``) needs no model: the alignment comes from
config files and the verdict from arrays.  Built here from the tiny configs in
:mod:`lora_parity.convert.tiny`, without torch or MindSpore, so judge checks run in milliseconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lora_parity.convert.tiny import TINY_TE1_CONFIG, TINY_TE2_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG
from lora_parity.fixtures.tiny_pipeline import SDXL_SCHEDULER_CONFIG
from lora_parity.sides.request import SideRequest, SideResult

TIMESTEPS = [500.0]
SIZE_COND = [[32, 32], [0, 0], [32, 32]]


def write_configs(folder: Path, *, refiner: bool = False) -> Path:
    """The config files of the tiny SDXL pipeline (no weights): what a bundle's ``configs/`` holds."""
    files = {
        "model_index.json": {"_class_name": "StableDiffusionXLPipeline", "requires_aesthetics_score": refiner},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **TINY_UNET_CONFIG},
        "vae/config.json": {"_class_name": "AutoencoderKL", **TINY_VAE_CONFIG},
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], **TINY_TE1_CONFIG},
        "text_encoder_2/config.json": {"architectures": ["CLIPTextModelWithProjection"], **TINY_TE2_CONFIG},
        "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER_CONFIG},
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(data))
    return folder


def request(configs: Path, side: str, *, steps: int | None = None, aesthetic=None, backend: str | None = None,
            dtype: str = "F32") -> SideRequest:
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    return SideRequest(side=side, pipeline_dir=str(configs), prompt="a cube", timesteps=list(TIMESTEPS),
                       size_cond=SIZE_COND, steps=steps, aesthetic=aesthetic, dtype=dtype,
                       backend=backend or ("diffusers" if side == "pt" else "mindone"), arrays={"latents": latents},
                       noise_source="given latents (test)")


def sides(configs: Path, *, steps: int | None = None, aesthetic=None, images: tuple[bool, bool] = (False, False),
          env: tuple[dict | None, dict | None] = (None, None)) -> tuple[SideResult, SideResult]:
    """(MindSpore side as the mindone backend, PyTorch side): identical activations at every aligned point
    (diffusers names on both), images if asked (identical, in [0, 1])."""
    from lora_parity.compare import alignment_for

    rng = np.random.default_rng(1)
    acts = {a.diffusers: rng.standard_normal((2, 8)).astype(np.float32)
            for a in alignment_for(configs, TIMESTEPS, "diffusers")}
    image = rng.uniform(0.1, 0.9, (8, 8, 3)).astype(np.float32)
    out = []
    for i, (side, backend) in enumerate((("ms", "mindone"), ("pt", "diffusers"))):
        req = request(configs, side, steps=steps, aesthetic=aesthetic, backend=backend)
        meta = {"side": side, "backend": backend, "dtype": "F32", "inputs": req.fingerprint(),
                "seconds_per_step": 0.01, "mindspore_settings": {"device_target": "CPU"} if side == "ms" else None}
        if env[i] is not None:
            meta["numerics_env"] = env[i]
        out.append(SideResult({k: v.copy() for k, v in acts.items()}, {"image": image.copy()} if images[i] else {},
                              meta))
    return out[0], out[1]
