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

The SDXL refiner runs as diffusers' ``StableDiffusionXLImg2ImgPipeline`` does with the
official refiner config (``requires_aesthetics_score=True``, ``force_zeros_for_empty_prompt=False``):

* ``y`` carries an aesthetic score instead of the target size (6.0 positive, 2.5 negative);
* the unconditional branch is the text encoder's output for the negative prompt (``""``,
  whose token ids the caller passes), with negative time ids
  ``negative_original_size + negative_crops_coords_top_left (0, 0) + (negative_aesthetic_score,)``;
* latents handed in as ``latents=`` are used as they are (``scale_initial_noise=False``) and
  ``strength`` starts the loop at a later step (``first_step``, see :func:`img2img_first_step`).

The phases are separate functions so a caller can free each model after its phase on a small
machine: :func:`condition` (token ids -> context, y, negative), :func:`denoise` (-> final
latents), :func:`decode` (-> images); :func:`generate_float` chains them.
"""
from __future__ import annotations

import sys
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from lora_parity.sampling import EulerSchedule, denormalize
from lora_parity.backends.port.unet import sdxl_vector

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


def unconditional(context: Tensor, y: Tensor, time_embed_dim: int, n_time_ids: int = 6) -> tuple[Tensor, Tensor]:
    """``force_zeros_for_empty_prompt``: zero context, zero pooled part of ``y``, same time-id part.

    ``n_time_ids``: numbers embedded at the end of ``y`` (6 for SDXL base; 5 for the refiner,
    whose diffusers pipeline however uses its negative aesthetic score there: build that with
    :func:`condition` and pass it to :func:`denoise` as ``negative``).
    """
    n_time = int(n_time_ids) * int(time_embed_dim)
    y_u = ops.concat([ops.zeros_like(y[:, :-n_time]), y[:, -n_time:]], axis=-1)
    return ops.zeros_like(context), y_u


def img2img_first_step(num_inference_steps: int, strength: float) -> int:
    """diffusers img2img ``get_timesteps``: the loop starts at ``steps - min(int(steps * strength), steps)``."""
    init = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init, 0)


def _tile_to(x: Tensor, batch: int) -> Tensor:
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"cannot repeat a batch of {x.shape[0]} to {batch}")
    reps = (batch // x.shape[0],) + (1,) * (x.ndim - 1)
    return ops.tile(x, reps)


def denoise(unet, noise: np.ndarray, context: Tensor, y: Tensor, schedule: EulerSchedule, guidance: float,
            time_embed_dim: int, progress: bool = False, *,
            negative: tuple[Tensor, Tensor] | None = None, scale_initial_noise: bool = True,
            first_step: int = 0, n_time_ids: int = 6) -> tuple[Tensor, float]:
    """The denoising loop; returns (final latents, seconds per step).

    ``y`` None: an SD 1.x / 2.x UNet (no vector conditioning); ``negative`` is then required for
    guidance, ``(context of "", None)``, as ``StableDiffusionPipeline`` encodes the empty negative prompt.
    ``negative``: the unconditional ``(context_u, y_u)`` for classifier-free guidance, as the
    caller built it (:func:`condition`); None keeps the base pipeline's
    ``force_zeros_for_empty_prompt`` branch (:func:`unconditional`, with ``n_time_ids``).
    ``scale_initial_noise``: multiply ``noise`` by ``init_noise_sigma`` (text-to-image); False
    takes it as the starting latents, as diffusers' img2img does with ``latents=``.
    ``first_step``: index of the first schedule step run (img2img ``strength``, see
    :func:`img2img_first_step`); the sigma/timestep tables are the full schedule's.
    """
    cfg = float(guidance) > 1.0
    n = len(schedule.timesteps)
    if not 0 <= int(first_step) < n:
        raise ValueError(f"first_step {first_step} outside a {n}-step schedule")
    if noise.shape[0] != context.shape[0]:  # one prompt, several noise samples (num_images_per_prompt)
        reps = noise.shape[0] // context.shape[0]
        context, y = ops.tile(context, (reps, 1, 1)), None if y is None else ops.tile(y, (reps, 1))
    if cfg and y is None:  # SD 1.x / 2.x: the context is the whole conditioning; the caller encodes ""
        if negative is None:
            raise ValueError("an SD 1.x / 2.x UNet (no vector y) needs the negative prompt's context for guidance")
        context = ops.concat([_tile_to(negative[0], context.shape[0]), context], axis=0)
    elif cfg:
        if negative is None:
            ctx_u, y_u = unconditional(context, y, time_embed_dim, n_time_ids)
        else:
            ctx_u, y_u = (_tile_to(t, context.shape[0]) for t in negative)
            if tuple(ctx_u.shape) != tuple(context.shape) or tuple(y_u.shape) != tuple(y.shape):
                raise ValueError(f"negative conditioning {tuple(ctx_u.shape)}, {tuple(y_u.shape)} does not match "
                                 f"{tuple(context.shape)}, {tuple(y.shape)}")
        context = ops.concat([ctx_u, context], axis=0)
        y = ops.concat([y_u, y], axis=0)
    latents = Tensor(np.asarray(noise, np.float32))
    if scale_initial_noise:
        latents = ops.mul(latents, _scalar(schedule.init_noise_sigma))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n - int(first_step), desc="mindspore", unit="step", file=sys.stderr)
    t0 = time.perf_counter()
    ends: list[float] = []
    try:
        for i in range(int(first_step), n):
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
    k = len(ends)
    seconds = (ends[-1] - ends[0]) / (k - 1) if k > 1 else (ends[-1] - t0 if ends else float("nan"))
    return latents, seconds


# diffusers StableDiffusionXLImg2ImgPipeline.__call__ defaults
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5


def _ids(ids) -> Tensor:
    return ids if isinstance(ids, Tensor) else Tensor(np.asarray(ids, np.int64))


def condition(comps, ids_per_encoder, size_cond, *, aesthetic_score: float | None = None,
              negative_ids=None, negative_size_cond=None, negative_aesthetic_score: float | None = None,
              force_zeros_for_empty_prompt: bool | None = None
              ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Token ids -> ``(context, y, negative)`` as diffusers' SDXL pipelines build them.

    ``size_cond``: (original size, crop top-left, target size).  For a refiner layout
    (``comps.uses_aesthetic_score``) ``aesthetic_score`` / ``negative_aesthetic_score`` default
    to diffusers' 6.0 / 2.5 and the target size is unused; a base layout refuses them.

    ``negative``: None when the base pipeline's zero unconditional applies unchanged (no
    negative ids, no negative sizes: :func:`denoise` builds it); otherwise ``(context_u, y_u)``:
    the encoders' output for ``negative_ids`` (the negative prompt, ``""`` by default in
    diffusers), or zeros when there are none and ``force_zeros_for_empty_prompt`` (default:
    True for base, False for the refiner, as the released configs say; then ``negative_ids``
    is required).  Negative time ids follow diffusers: refiner ``negative_original_size``
    (default: the positive) + ``negative_crops_coords_top_left`` (default (0, 0)) + negative
    score; base ``negative_original_size`` + the *positive* crop + ``negative_target_size``.
    """
    refiner = comps.uses_aesthetic_score
    orig, crop, target = size_cond
    if refiner:
        score = DEFAULT_AESTHETIC_SCORE if aesthetic_score is None else float(aesthetic_score)
        neg_score = (DEFAULT_NEGATIVE_AESTHETIC_SCORE if negative_aesthetic_score is None
                     else float(negative_aesthetic_score))
    else:
        if aesthetic_score is not None or negative_aesthetic_score is not None:
            raise ValueError("this model (SDXL base layout) has no aesthetic-score conditioning")
        score = neg_score = None
    context, y = comps.conditioning([_ids(i) for i in ids_per_encoder], orig, crop, target, aesthetic_score=score)

    zeros = (not refiner) if force_zeros_for_empty_prompt is None else bool(force_zeros_for_empty_prompt)
    if negative_ids is None and not zeros:
        raise ValueError("this pipeline encodes the negative prompt (force_zeros_for_empty_prompt is False, as "
                         "in the SDXL refiner): pass negative_ids, the token ids of the negative prompt (\"\")")
    if negative_ids is None and negative_size_cond is None and not refiner:
        return context, y, None  # base default: denoise() zeroes context and pooled, keeps the time ids
    n_orig, n_crop, n_target = negative_size_cond or (None, None, None)
    n_orig = orig if n_orig is None else n_orig
    n_target = target if n_target is None else n_target
    if refiner:
        n_crop = (0, 0) if n_crop is None else n_crop
    else:
        n_crop = crop  # diffusers' base time ids ignore negative_crops_coords_top_left here
    if negative_ids is not None:
        ctx_u, y_u = comps.conditioning([_ids(i) for i in negative_ids], n_orig, n_crop, n_target,
                                        aesthetic_score=neg_score)
    else:
        lay = comps.unet.layout
        pooled_u = ops.zeros((context.shape[0], comps.pooled_dim), ms.float32)
        y_u = sdxl_vector(pooled_u, n_orig, n_crop, n_target, lay.addition_time_embed_dim,
                          aesthetic_score=neg_score, adm_in_channels=lay.adm_in_channels)
        ctx_u = ops.zeros_like(context)
    return context, y, (ctx_u, y_u)


def decode(comps, latents: Tensor) -> np.ndarray:
    """Final latents -> every image as float32 (N, H, W, 3) in [0, 1] (VAE decode, diffusers' post-processing)."""
    if comps.vae is None:
        raise ValueError("the model was built without a VAE decoder")
    return denormalize(comps.vae(latents).asnumpy())


def generate_float(comps, ids_per_encoder, noise: np.ndarray, schedule: EulerSchedule, guidance: float,
                   size_cond, progress: bool = False, *, aesthetic_score: float | None = None,
                   negative_ids=None, negative_size_cond=None, negative_aesthetic_score: float | None = None,
                   force_zeros_for_empty_prompt: bool | None = None, scale_initial_noise: bool = True,
                   first_step: int = 0) -> tuple[np.ndarray, float]:
    """Prompt token ids -> first image as float32 (H, W, 3) in [0, 1]; and seconds per step.

    :func:`condition`, :func:`denoise`, :func:`decode` in turn (see them for the keyword
    arguments); the defaults are diffusers' text-to-image SDXL base pipeline.  For the refiner
    as ``StableDiffusionXLImg2ImgPipeline`` runs it from ``latents=``: ``negative_ids`` (ids of
    ``""``), ``scale_initial_noise=False``, ``first_step=img2img_first_step(steps, strength)``.
    """
    if comps.vae is None:
        raise ValueError("the model was built without a VAE decoder")
    context, y, negative = condition(
        comps, ids_per_encoder, size_cond, aesthetic_score=aesthetic_score, negative_ids=negative_ids,
        negative_size_cond=negative_size_cond, negative_aesthetic_score=negative_aesthetic_score,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    latents, per_step = denoise(comps.unet, noise, context, y, schedule, guidance,
                                comps.unet.layout.addition_time_embed_dim, progress, negative=negative,
                                scale_initial_noise=scale_initial_noise, first_step=first_step,
                                n_time_ids=comps.time_id_count)
    return decode(comps, latents)[0], per_step
