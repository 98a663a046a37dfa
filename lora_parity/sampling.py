"""Framework-free Euler sampling schedule and image post-processing (numpy only).

:class:`EulerSchedule` reproduces diffusers' ``EulerDiscreteScheduler`` (0.42) for
the settings SDXL ships with, number for number:

* betas: ``torch.linspace(a, b, N, dtype=float32)`` (of ``sqrt(beta)`` for
  ``scaled_linear``, squared in float32).  torch's CPU kernel computes element
  ``i`` as ``start + step * i`` (``end - step * (N - 1 - i)`` for the second half)
  with a fused multiply-add, i.e. one rounding to float32; numpy's ``linspace``
  rounds differently in ~15% of the entries, so :func:`torch_linspace_f32`
  emulates torch (exact on x86-64 builds, where the kernel is compiled with FMA).
* ``alphas_cumprod`` = cumprod of the float32 ``1 - beta`` accumulated in float64 (torch's
  CPU cumprod), each entry rounded to float32; training sigmas
  ``sqrt((1 - ac) / ac)`` in float32.
* timesteps per ``timestep_spacing`` ("leading" + ``steps_offset``, "linspace",
  "trailing") as float32; step sigmas = ``np.interp`` of the float32 training
  sigmas at those timesteps, computed in float64, a final sigma appended ("zero"
  or "sigma_min"), then cast to float32.
* ``init_noise_sigma`` = ``sqrt(sigma_max**2 + 1)`` for "leading", ``sigma_max``
  for "linspace"/"trailing" (float32 arithmetic).
* ``scale_model_input``: ``x / sqrt(sigma**2 + 1)``; ``step`` (``s_churn = 0``, so
  ``sigma_hat = sigma``): ``x0 = x - sigma * eps`` (epsilon) or
  ``eps * (-sigma / sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)`` (v_prediction),
  ``d = (x - x0) / sigma``, ``x + d * (sigma_next - sigma)``, every operation a
  float32 operation in that order.

Exactness: timesteps, betas and ``alphas_cumprod`` match torch bit for bit.  The
training sigmas' square root does not always: torch's vectorised CPU ``sqrt`` /
``** 0.5`` (MKL VML, high-accuracy mode) is within 1 ulp but not correctly rounded,
while numpy's is; about 19% of the 1000 SDXL training sigmas differ by 1 ulp
(relative 6e-8).  The step arithmetic itself (:func:`scale_input`,
:func:`euler_step`) is bit-identical to diffusers' for the same sigmas.

Not supported (raises ``ValueError``): Karras / exponential / beta sigmas,
``log_linear`` interpolation, continuous timesteps, zero-SNR rescaling, trained betas.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_F = np.float32

SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    start/end are rounded to float32 and ``step = (end - start) / (steps - 1)`` in float32;
    element ``i`` is ``fma(step, i, start)`` for ``i < steps // 2`` and
    ``fma(-step, steps - 1 - i, end)`` otherwise.  The product of a float32 and an
    integer below 2**29 is exact in float64, so float64 add + one cast is the fma.
    """
    if steps == 1:
        return np.array([start], dtype=_F)
    s, e = _F(start), _F(end)
    step = _F((e - s) / _F(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lo = np.float64(s) + np.float64(step) * i
    hi = np.float64(e) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, lo, hi).astype(_F)


@dataclass(frozen=True, eq=False)
class EulerSchedule:
    """The Euler discrete schedule for ``num_inference_steps`` steps (see the module doc)."""

    num_inference_steps: int
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    timesteps: np.ndarray = field(init=False, repr=False)
    sigmas: np.ndarray = field(init=False, repr=False)
    train_sigmas: np.ndarray = field(init=False, repr=False)

    # diffusers config keys that must hold these values (anything else is not modelled)
    _REQUIRED = {"interpolation_type": "linear", "use_karras_sigmas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "timestep_type": "discrete", "rescale_betas_zero_snr": False,
                 "trained_betas": None}

    def __post_init__(self) -> None:
        n = int(self.num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not one of {SPACINGS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        train_sigmas, alphas_cumprod = _train_sigmas(self.beta_start, self.beta_end, self.beta_schedule,
                                                     self.num_train_timesteps)
        timesteps = _timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        sig = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)  # float64, as diffusers
        if self.final_sigmas_type == "zero":
            last = 0
        elif self.final_sigmas_type == "sigma_min":
            last = np.sqrt((_F(1) - alphas_cumprod[0]) / alphas_cumprod[0])
        else:
            raise ValueError(f"final_sigmas_type {self.final_sigmas_type!r} is not 'zero' or 'sigma_min'")
        sigmas = np.concatenate([sig, [last]]).astype(_F)
        object.__setattr__(self, "timesteps", timesteps.astype(_F))
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "train_sigmas", train_sigmas)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: dict, num_inference_steps: int) -> "EulerSchedule":
        """From a diffusers ``scheduler_config.json`` dict (diffusers' defaults for absent keys)."""
        cls_name = config.get("_class_name", "EulerDiscreteScheduler")
        if cls_name != "EulerDiscreteScheduler":
            raise ValueError(f"only EulerDiscreteScheduler is modelled, the config names {cls_name}")
        for key, want in cls._REQUIRED.items():
            got = config.get(key, want)
            if (got or None) != (want or None):
                raise ValueError(f"scheduler setting {key}={got!r} is not supported (only {want!r})")
        return cls(num_inference_steps=int(num_inference_steps),
                   num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   beta_start=float(config.get("beta_start", 0.0001)),
                   beta_end=float(config.get("beta_end", 0.02)),
                   beta_schedule=str(config.get("beta_schedule", "linear")),
                   prediction_type=str(config.get("prediction_type", "epsilon")),
                   timestep_spacing=str(config.get("timestep_spacing", "linspace")),
                   steps_offset=int(config.get("steps_offset", 0)),
                   final_sigmas_type=str(config.get("final_sigmas_type", "zero")))

    @classmethod
    def from_pipeline_dir(cls, pipeline_dir: str | Path, num_inference_steps: int) -> "EulerSchedule":
        """From ``pipeline_dir/scheduler/scheduler_config.json``."""
        path = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
        return cls.from_config(json.loads(path.read_text()), num_inference_steps)

    # ------------------------------------------------------------ scalars

    @property
    def init_noise_sigma(self) -> np.float32:
        top = self.sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return _F(top)
        return _F(np.sqrt(_F(top * top) + _F(1)))

    def input_divisor(self, i: int) -> np.float32:
        """``sqrt(sigma_i**2 + 1)`` in float32: ``scale_model_input`` divides by it."""
        s = self.sigmas[i]
        return _F(np.sqrt(_F(s * s) + _F(1)))

    def sigma(self, i: int) -> np.float32:
        return _F(self.sigmas[i])

    def dt(self, i: int) -> np.float32:
        """``sigma_{i+1} - sigma_i`` (float32): the Euler step length."""
        return _F(self.sigmas[i + 1] - self.sigmas[i])

    def v_coefficients(self, i: int) -> tuple[np.float32, np.float32]:
        """v_prediction: ``x0 = v * c_out + x / c_in2`` with ``(c_out, c_in2)`` in float32."""
        s = self.sigmas[i]
        c_in2 = _F(_F(s * s) + _F(1))
        return _F(-s / _F(np.sqrt(c_in2))), c_in2

    # ------------------------------------------------------------ numpy reference arithmetic

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return scale_input(x, self.sigma(i))

    def step(self, eps: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        """One Euler step from step ``i`` (``s_churn = 0``); returns the next sample (float32)."""
        return euler_step(eps, x, self.sigma(i), self.sigma(i + 1), self.prediction_type)


def scale_input(x: np.ndarray, sigma) -> np.ndarray:
    """``x / sqrt(sigma**2 + 1)`` with every operation in float32 (diffusers' ``scale_model_input``)."""
    s = _F(sigma)
    return (np.asarray(x, _F) / _F(np.sqrt(_F(s * s) + _F(1)))).astype(_F)


def euler_step(eps: np.ndarray, x: np.ndarray, sigma, sigma_next, prediction_type: str = "epsilon") -> np.ndarray:
    """diffusers' ``EulerDiscreteScheduler.step`` arithmetic (``s_churn = 0``) for given sigmas, float32."""
    x = np.asarray(x, _F)
    eps = np.asarray(eps, _F)
    s, s_next = _F(sigma), _F(sigma_next)
    if prediction_type == "epsilon":
        x0 = x - s * eps
    elif prediction_type == "v_prediction":
        c_in2 = _F(_F(s * s) + _F(1))
        x0 = eps * _F(-s / _F(np.sqrt(c_in2))) + x / c_in2
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    derivative = (x - x0) / s
    return (x + derivative * _F(s_next - s)).astype(_F)


def _train_sigmas(beta_start: float, beta_end: float, schedule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if schedule == "scaled_linear":
        r = torch_linspace_f32(beta_start ** 0.5, beta_end ** 0.5, n)
        betas = r * r
    elif schedule == "linear":
        betas = torch_linspace_f32(beta_start, beta_end, n)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported ('scaled_linear' or 'linear')")
    # torch.cumprod on CPU accumulates float32 in float64 (acc_type) and rounds each output
    alphas_cumprod = np.cumprod((_F(1) - betas).astype(np.float64)).astype(_F)
    sigmas = np.sqrt((_F(1) - alphas_cumprod) / alphas_cumprod).astype(_F)
    return sigmas, alphas_cumprod


def _timesteps(spacing: str, n_train: int, n: int, offset: int) -> np.ndarray:
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=_F)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(_F)
        return ts + _F(offset)
    ratio = n_train / n  # trailing
    return np.arange(n_train, 0, -ratio).round().copy().astype(_F) - _F(1)


# ---------------------------------------------------------------- images


def denormalize(decoded: np.ndarray) -> np.ndarray:
    """VAE output (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) float32 in [0, 1].

    diffusers' ``VaeImageProcessor.postprocess(output_type="np")``: ``(x * 0.5 + 0.5)``
    clamped to [0, 1] in float32, then channels last.
    """
    x = np.asarray(decoded, dtype=_F)
    x = np.clip(x * _F(0.5) + _F(0.5), _F(0), _F(1))
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 exactly as diffusers' ``numpy_to_pil``:
    ``(image * 255).round().astype("uint8")`` in the image's own (float32) precision."""
    x = np.asarray(image)
    if x.dtype != np.float32:
        x = x.astype(_F)
    return (x * _F(255)).round().astype(np.uint8)


def image_mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute error of two uint8 images on the 0..255 scale."""
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images; ``inf`` when equal."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
