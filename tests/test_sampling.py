"""Sampling in both backends: the Euler schedule against diffusers on its own, the MindSpore
step arithmetic, and whole images (MindSpore sampler vs the diffusers SDXL pipeline)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from lora_parity.sampling import EulerSchedule, euler_step, image_mae, image_psnr, to_uint8
from lora_parity.parity.tolerances import (
    IMAGE_MAE_FP32_TARGET,
    IMAGE_MAE_MAX,
    LORA_EFFECT_FACTOR,
    SAME_FRAMEWORK,
)

STEPS = (1, 2, 5, 30)
IMAGE_STEPS = 3
IMAGE_GUIDANCE = 5.0


def _sdxl_config() -> dict:
    from lora_parity.fixtures.tiny_pipeline import SDXL_SCHEDULER_CONFIG

    return dict(SDXL_SCHEDULER_CONFIG)


def _diffusers(config: dict, steps: int):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps)
    return sched


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """The suite's layer metric: max |a - b| / max |ref|."""
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / max(np.max(np.abs(ref)), np.finfo(float).tiny))


def schedule_errors(ours: EulerSchedule, ref) -> list[str]:
    """What differs between our schedule tables and a diffusers scheduler after ``set_timesteps``."""
    errors = []
    if not np.array_equal(ours.timesteps, ref.timesteps.numpy()):
        errors.append(f"timesteps {ours.timesteps.tolist()} != {ref.timesteps.numpy().tolist()}")
    sig = ref.sigmas.numpy()
    if ours.sigmas.shape != sig.shape or not np.allclose(ours.sigmas, sig, rtol=SAME_FRAMEWORK.rtol,
                                                          atol=SAME_FRAMEWORK.atol):
        errors.append(f"sigmas {ours.sigmas.tolist()} != {sig.tolist()}")
    if _rel(np.float32(ours.init_noise_sigma), np.float32(ref.init_noise_sigma)) > SAME_FRAMEWORK.rel:
        errors.append(f"init_noise_sigma {ours.init_noise_sigma} != {float(ref.init_noise_sigma)}")
    return errors


# ---------------------------------------------------------------- schedule vs diffusers


@pytest.fixture(scope="module")
def pipeline_scheduler_config(tiny_pipeline_dir) -> dict:
    return json.loads((Path(tiny_pipeline_dir) / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parity
@pytest.mark.parametrize("steps", STEPS)
def test_schedule_tables_match_diffusers_pipeline_scheduler(tiny_pipeline_dir, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.EulerDiscreteScheduler.from_pretrained(str(Path(tiny_pipeline_dir) / "scheduler"))
    ref.set_timesteps(steps)
    ours = EulerSchedule.from_pipeline_dir(tiny_pipeline_dir, steps)
    assert ours.timestep_spacing == "leading" and ours.steps_offset == 1  # the SDXL settings
    assert schedule_errors(ours, ref) == []
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    assert ours.sigmas[-1] == 0 and len(ours.sigmas) == steps + 1


@pytest.mark.parity
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", STEPS)
def test_scale_and_step_match_diffusers(spacing, prediction, steps):
    """A whole trajectory on random model outputs: scaled inputs and every step's sample."""
    config = dict(_sdxl_config(), timestep_spacing=spacing, prediction_type=prediction)
    torch = pytest.importorskip("torch")
    ref = _diffusers(config, steps)
    ours = EulerSchedule.from_config(config, steps)
    assert schedule_errors(ours, ref) == []
    rng = np.random.default_rng(steps)
    x = (rng.standard_normal((2, 4, 16, 16)) * float(ours.init_noise_sigma)).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        scaled = ref.scale_model_input(torch.from_numpy(x), t).numpy()
        assert _rel(ours.scale_model_input(x, i), scaled) <= SAME_FRAMEWORK.rel
        eps = rng.standard_normal(x.shape).astype(np.float32)
        nxt = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
        assert _rel(ours.step(eps, i, x), nxt) <= SAME_FRAMEWORK.rel, f"step {i}"
        x = nxt  # follow diffusers' trajectory: each step is checked on its own


@pytest.mark.parity
@pytest.mark.parametrize("steps", STEPS)
def test_epsilon_step_arithmetic_is_bitwise_for_the_same_sigmas(steps):
    """With diffusers' own sigma table the Euler update is the same float32 operations, bit for bit."""
    torch = pytest.importorskip("torch")
    ref = _diffusers(_sdxl_config(), steps)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1, 4, 16, 16)) * 10).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(x.shape).astype(np.float32)
        ref.scale_model_input(torch.from_numpy(x), t)
        nxt = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
        mine = euler_step(eps, x, ref.sigmas[i].numpy(), ref.sigmas[i + 1].numpy())
        np.testing.assert_array_equal(mine, nxt)
        x = nxt


@pytest.mark.parity
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_mindspore_step_arithmetic_matches_numpy_and_diffusers(prediction):
    ms = pytest.importorskip("mindspore")
    torch = pytest.importorskip("torch")
    from lora_parity.backends.port import sampler

    steps = 5
    config = dict(_sdxl_config(), prediction_type=prediction)
    ref = _diffusers(config, steps)
    ours = EulerSchedule.from_config(config, steps)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1, 4, 16, 16)) * float(ours.init_noise_sigma)).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        scaled = sampler.scale_input(ms.Tensor(x), ours, i).asnumpy()
        np.testing.assert_array_equal(scaled, ours.scale_model_input(x, i))
        assert _rel(scaled, ref.scale_model_input(torch.from_numpy(x), t).numpy()) <= SAME_FRAMEWORK.rel
        uncond, cond = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
        eps = sampler.guide(ms.Tensor(uncond), ms.Tensor(cond), IMAGE_GUIDANCE).asnumpy()
        torch_eps = torch.from_numpy(uncond) + IMAGE_GUIDANCE * (torch.from_numpy(cond) - torch.from_numpy(uncond))
        np.testing.assert_array_equal(eps, torch_eps.numpy())
        nxt = sampler.euler_step(ms.Tensor(eps), ms.Tensor(x), ours, i).asnumpy()
        np.testing.assert_array_equal(nxt, ours.step(eps, i, x))
        ref_next = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
        assert _rel(nxt, ref_next) <= SAME_FRAMEWORK.rel
        x = ref_next


# ---------------------------------------------------------------- the check catches faults


@pytest.mark.parametrize("fault", [
    {"timestep_spacing": "linspace"},
    {"timestep_spacing": "trailing"},
    {"steps_offset": 0},
    {"steps_offset": 2},
    {"beta_end": 0.0121},
])
@pytest.mark.parity
@pytest.mark.parametrize("steps", [2, 5, 30])
def test_wrong_schedule_settings_fail_the_check(fault, steps):
    config = _sdxl_config()
    ref = _diffusers(config, steps)
    wrong = EulerSchedule.from_config(dict(config, **fault), steps)
    assert schedule_errors(wrong, ref), f"{fault} went unnoticed"


@pytest.mark.parity
def test_off_by_one_step_count_fails_the_check():
    config = _sdxl_config()
    assert schedule_errors(EulerSchedule.from_config(config, 5), _diffusers(config, 4))


@pytest.mark.parity
def test_unsupported_scheduler_settings_are_refused():
    config = _sdxl_config()
    for bad in ({"use_karras_sigmas": True}, {"interpolation_type": "log_linear"},
                {"timestep_spacing": "karras"}, {"_class_name": "DDIMScheduler"}):
        with pytest.raises(ValueError):
            EulerSchedule.from_config(dict(config, **bad), 4)


@pytest.mark.parity
def test_to_uint8_is_diffusers_numpy_to_pil():
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3)).astype(np.float32)
    img[0, :4, 0] = np.float32([0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0])  # round-half cases
    np.testing.assert_array_equal(to_uint8(img), np.asarray(VaeImageProcessor.numpy_to_pil(img)[0]))


# ---------------------------------------------------------------- whole images


@dataclass
class Images:
    ms_lora: np.ndarray
    pt_lora: np.ndarray
    ms_base: np.ndarray
    pt_base: np.ndarray
    seconds_per_step: dict


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    pytest.importorskip("mindspore")
    pytest.importorskip("diffusers")
    from lora_parity.fixtures.bundle import write_fixture

    return write_fixture(tmp_path_factory.mktemp("sampling") / "fx")


@pytest.fixture(scope="module")
def images(fx, tmp_path_factory) -> Images:
    from lora_parity.infer import generate

    latents = np.load(fx.latents)
    prompt = fx.prompt.read_text().strip()
    out, per_step = {}, {}
    runs = {"ms_lora": ("ms", {"ms_base": fx.ms_base, "ms_lora": fx.ms_lora}),
            "pt_lora": ("pt", {"ms_lora": fx.ms_lora}),  # converted with lora_parity.convert.converter on the fly
            "ms_base": ("ms", {"ms_base": fx.ms_base}),
            "pt_base": ("pt", {})}
    for name, (backend, kw) in runs.items():
        img, sps = generate(backend, fx.pt_base, prompt=prompt, latents=latents, steps=IMAGE_STEPS,
                            guidance=IMAGE_GUIDANCE, progress=False, **kw)
        assert img.dtype == np.float32 and img.shape == (32, 32, 3)
        assert 0 <= img.min() and img.max() <= 1
        out[name], per_step[name] = to_uint8(img), sps
    return Images(**out, seconds_per_step=per_step)


@pytest.fixture
def mae_max(request) -> float:
    value = request.config.getoption("--image-mae")
    return IMAGE_MAE_MAX if value is None else value


@pytest.mark.image
def test_lora_images_agree_across_frameworks(images, mae_max, record_property):
    mae = image_mae(images.ms_lora, images.pt_lora)
    record_property("image_mae_lora", mae)
    record_property("image_psnr_lora", image_psnr(images.ms_lora, images.pt_lora))
    record_property("seconds_per_step", images.seconds_per_step)
    assert mae < IMAGE_MAE_FP32_TARGET
    assert mae < mae_max


@pytest.mark.image
def test_base_images_agree_across_frameworks(images, mae_max, record_property):
    mae = image_mae(images.ms_base, images.pt_base)
    record_property("image_mae_base", mae)
    assert mae < IMAGE_MAE_FP32_TARGET
    assert mae < mae_max


@pytest.mark.image
def test_lora_changes_the_image_far_beyond_the_threshold(images, mae_max, record_property):
    for side in ("ms", "pt"):
        effect = image_mae(getattr(images, f"{side}_lora"), getattr(images, f"{side}_base"))
        record_property(f"lora_effect_mae_{side}", effect)
        assert effect > LORA_EFFECT_FACTOR * mae_max, side


@pytest.mark.image
def test_infer_writes_pngs_that_agree(fx, tmp_path):
    from PIL import Image

    from lora_parity.infer import run_infer

    pngs = {}
    for backend, kw in (("ms", {"ms_base": fx.ms_base}), ("pt", {})):
        pngs[backend] = run_infer(backend, fx.pt_base, latents_npy=fx.latents, steps=2, guidance=IMAGE_GUIDANCE,
                                  out_png=tmp_path / f"{backend}.png", progress=False, **kw)
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (pngs["ms"], pngs["pt"]))
    assert a.shape == b.shape == (32, 32, 3)
    assert image_mae(a, b) < IMAGE_MAE_FP32_TARGET


@pytest.mark.parity
def test_infer_tokenizer_matches_the_pipeline(tiny_pipeline_dir):
    pytest.importorskip("diffusers")
    from lora_parity.backends.diffusers.view import TorchBackend
    from lora_parity.infer import tokenize

    prompt = "a photo of a red cube on a wooden table"
    ours = tokenize(tiny_pipeline_dir, prompt)
    theirs = TorchBackend(tiny_pipeline_dir).tokenize(prompt)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
