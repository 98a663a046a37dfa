"""What both sides of a run start from, derived from the pipeline folder: latents and size conditioning.

``compare``, ``capture`` and ``infer`` all need these; kept below them, so ``compare`` and ``infer`` never
import each other (``infer`` builds on ``compare``'s requests).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lora_parity.errors import LoraParityError


def vae_scale_factor(pipeline_dir: str | Path) -> int:
    """diffusers' ``2 ** (len(vae.block_out_channels) - 1)``."""
    cfg = json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text())
    return 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1)


def default_size_cond(pipeline_dir: str | Path, latents: np.ndarray):
    """What the pipeline uses when no sizes are given: original = target = (H, W) of the image, crop (0, 0)."""
    f = vae_scale_factor(pipeline_dir)
    hw = (int(latents.shape[-2]) * f, int(latents.shape[-1]) * f)
    return hw, (0, 0), hw


def read_latents(path: str | Path | None, pipeline_dir: str | Path | None = None) -> np.ndarray:
    """Initial noise from ``.npy`` (default: the built-in seed-0 noise), checked against the UNet.

    The UNet needs ``C == in_channels`` and H, W divisible by 2 ** (levels - 1); a mismatch is
    an input error named here, not a framework traceback later.
    """
    if path is None:
        from lora_parity.fixtures.tiny_pipeline import make_latents

        arr = make_latents(0)
    else:
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any reader failure is an input error
            raise LoraParityError(f"cannot read latents: {exc}", path=path) from None
    where = path if path is not None else "built-in latents"
    if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
        raise LoraParityError(f"latents must be float (N, C, H, W), got {arr.dtype} {list(arr.shape)}", path=where)
    if pipeline_dir is not None:
        import json

        cfg = json.loads((Path(pipeline_dir) / "unet" / "config.json").read_text())
        channels = int(cfg.get("in_channels", 4))
        factor = 2 ** (len(cfg["block_out_channels"]) - 1)
        if arr.shape[1] != channels or arr.shape[2] % factor or arr.shape[3] % factor:
            raise LoraParityError(f"latents {list(arr.shape)} do not fit this UNet: need {channels} channels and "
                                  f"H, W divisible by {factor}", path=where)
    if not np.isfinite(arr).all():
        raise LoraParityError("latents contain NaN or Inf", path=where)
    return arr.astype(np.float32)
