"""Text-to-image sampling in MindSpore: Euler schedule, classifier-free guidance, VAE decode.

The UNet and every per-step operation (input scaling, guidance combine, Euler
update) run as MindSpore float32 ops; only the schedule's scalar tables come
from :class:`lora_parity.sampling.EulerSchedule` (numpy).  The loop mirrors
diffusers 0.42's ``StableDiffusionXLPipeline.__call__`` for one prompt, no
negative prompt, ``guidance_rescale = 0``:

* guidance on when ``guidance > 1`` (the UNet has no ``time_cond_proj_dim``);
  then the UNet runs one batch ``[uncond, cond]`` where, with
  ``force_zeros_for_empty_prompt`` (SDXL default), the unconditional context and
  pooled embedding are zeros and the size/crop time ids are the positive ones;
* ``latents = noise * init_noise_sigma``;
* per step: ``scale_model_input`` -> UNet(t) -> ``u + g * (c - u)`` -> Euler step;
* the final latents are decoded by the VAE (``/ scaling_factor`` inside) and
  post-processed to float32 HxWx3 in [0, 1] with :func:`lora_parity.sampling.denormalize`.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from ...sampling import EulerSchedule, denormalize

_F32 = ms.float32


def _scalar(value) -> Tensor:
    return Tensor(np.asarray(value, dtype=np.float32))


def scale_input(x: Tensor, schedule: EulerSchedule, i: int) -> Tensor:
    """``x / sqrt(sigma_i**2 + 1)`` (the divisor from the schedule, the division in MindSpore)."""
    return ops.div(x, _scalar(schedule.input_divisor(i)))


def guide(eps_uncond: Tensor, eps_cond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance ``u + g * (c - u)`` in float32."""
    return ops.add(eps_uncond, ops.mul(_scalar(guidance), ops.sub(eps_cond, eps_uncond)))


def euler_step(eps: Tensor, x: Tensor, schedule: EulerSchedule, i: int) -> Tensor:
    """diffusers' Euler step (``s_churn = 0``) from step ``i`` as MindSpore ops, same operation order."""
    sigma = _scalar(schedule.sigma(i))
    if schedule.prediction_type == "epsilon":
        x0 = ops.sub(x, ops.mul(sigma, eps))
    else:
        c_out, c_in2 = schedule.v_coefficients(i)
        x0 = ops.add(ops.mul(eps, _scalar(c_out)), ops.div(x, _scalar(c_in2)))
    derivative = ops.div(ops.sub(x, x0), sigma)
    return ops.add(x, ops.mul(derivative, _scalar(schedule.dt(i))))


def unconditional(context: Tensor, y: Tensor, time_embed_dim: int) -> tuple[Tensor, Tensor]:
    """``force_zeros_for_empty_prompt``: zero context, zero pooled part of ``y``, same time-id part."""
    n_time = 6 * int(time_embed_dim)  # original size, crop, target size: 2 numbers each
    y_u = ops.concat([ops.zeros_like(y[:, :-n_time]), y[:, -n_time:]], axis=-1)
    return ops.zeros_like(context), y_u


def denoise(unet, noise: np.ndarray, context: Tensor, y: Tensor, schedule: EulerSchedule, guidance: float,
            time_embed_dim: int, progress: bool = False) -> tuple[Tensor, float]:
    """The denoising loop; returns (final latents, seconds per step)."""
    cfg = float(guidance) > 1.0
    if noise.shape[0] != context.shape[0]:  # one prompt, several noise samples (num_images_per_prompt)
        reps = noise.shape[0] // context.shape[0]
        context, y = ops.tile(context, (reps, 1, 1)), ops.tile(y, (reps, 1))
    if cfg:
        ctx_u, y_u = unconditional(context, y, time_embed_dim)
        context = ops.concat([ctx_u, context], axis=0)
        y = ops.concat([y_u, y], axis=0)
    latents = ops.mul(Tensor(np.asarray(noise, np.float32)), _scalar(schedule.init_noise_sigma))
    n = len(schedule.timesteps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="mindspore", unit="step", file=sys.stderr, leave=False)
    t0 = time.perf_counter()
    ends: list[float] = []
    try:
        for i in range(n):
            model_in = ops.concat([latents, latents], axis=0) if cfg else latents
            model_in = scale_input(model_in, schedule, i)
            t = Tensor(np.full((model_in.shape[0],), schedule.timesteps[i], np.float32))
            eps = unet(model_in, t, context, y)
            if cfg:
                half = latents.shape[0]
                eps = guide(eps[:half], eps[half:], guidance)
            latents = euler_step(eps, latents, schedule, i)
            ends.append(time.perf_counter())
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    # between step ends, as the PyTorch side measures: the first step also pays warm-up / graph compile
    seconds = (ends[-1] - ends[0]) / (n - 1) if n > 1 else (ends[-1] - t0 if ends else float("nan"))
    return latents, seconds


def generate_float(comps, ids_per_encoder, noise: np.ndarray, schedule: EulerSchedule, guidance: float,
                   size_cond, progress: bool = False) -> tuple[np.ndarray, float]:
    """Prompt token ids -> first image as float32 (H, W, 3) in [0, 1]; and seconds per step."""
    if comps.vae is None:
        raise ValueError("the model was built without a VAE decoder")
    orig, crop, target = size_cond
    context, y = comps.conditioning([Tensor(np.asarray(i, np.int64)) for i in ids_per_encoder], orig, crop, target)
    latents, per_step = denoise(comps.unet, noise, context, y, schedule, guidance,
                                comps.unet.layout.addition_time_embed_dim, progress)
    decoded = comps.vae(latents)
    return denormalize(decoded.asnumpy())[0], per_step
