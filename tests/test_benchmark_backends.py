"""UNet forward speed, MindSpore cells against diffusers, on the tiny SDXL (group "unet-forward-tiny").

The same random weights (drawn in diffusers, converted with the project's full-weight key
map) and the same classifier-free-guidance batch (2 latents of 4x16x16, context
(2, 77, 64), y (2, 80)) for every variant:

* MindSpore PyNative, default convolution (im2col + MatMul);
* MindSpore PyNative, MindSpore's own Conv2D kernel (``set_conv_impl(unet, "native")``);
* MindSpore graph mode (``compile_for_graph``), default convolution;
* diffusers ``UNet2DConditionModel``.

``make bench`` times them (compare the medians); in ``make test`` (benchmarks disabled)
each body runs once and its checks still count: output shape, finite values and
agreement with diffusers within the float32 layer tolerance.  Nothing here asserts
a time.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lora_parity.parity.tolerances import layer_tolerance

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")
diffusers = pytest.importorskip("diffusers")

from lora_parity.backends.port import (SGM_UNET_PREFIX, UNetModel, compile_for_graph,  # noqa: E402
                                            configure_cpu, load_params, sdxl_vector, set_conv_impl)
from lora_parity.convert.fullweights import diffusers_to_sgm, param_maps  # noqa: E402
from lora_parity.convert.tiny import TINY_LATENT_SHAPE, TINY_UNET_CONFIG  # noqa: E402
from lora_parity.convert.layout import tiny_layout  # noqa: E402

GROUP = "unet-forward-tiny"
BATCH = 2  # classifier-free guidance: [uncond, cond]
SEQ = 77
TIMESTEP = 437.0
SIZES = ((32, 32), (0, 0), (32, 32))  # original size, crop top-left, target size
TOL = layer_tolerance("F32").rel


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights (diffusers zero-initialises several layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def torch_unet():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        **{k: v for k, v in TINY_UNET_CONFIG.items() if not k.startswith("_")}).eval()
    _randomize(unet, 0)
    return unet


@pytest.fixture(scope="module")
def sgm_unet_weights(torch_unet) -> dict[str, np.ndarray]:
    sd = {f"unet.{k}": v.detach().numpy() for k, v in torch_unet.state_dict().items()}
    maps = [m for m in param_maps(tiny_layout()) if m.sgm.startswith(SGM_UNET_PREFIX)]
    return diffusers_to_sgm(sd, maps)


@pytest.fixture(scope="module", autouse=True)
def _mindspore_cpu():
    configure_cpu()  # before the first MindSpore op: synchronous launch, ~10x faster PyNative


def _ms_unet(weights: dict[str, np.ndarray]) -> UNetModel:
    unet = UNetModel(tiny_layout().unet)
    assert load_params(unet, weights) == []
    return unet


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    latent = rng.standard_normal(TINY_LATENT_SHAPE).astype(np.float32)
    ctx_dim = TINY_UNET_CONFIG["cross_attention_dim"]
    return {
        "x": np.concatenate([latent] * BATCH),  # the same latent twice, as CFG does
        "t": np.full((BATCH,), TIMESTEP, np.float32),
        "context": rng.standard_normal((BATCH, SEQ, ctx_dim)).astype(np.float32),
        "pooled": rng.standard_normal((BATCH, 32)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def ms_inputs(inputs):
    y = sdxl_vector(ms.Tensor(inputs["pooled"]), *SIZES, dim=TINY_UNET_CONFIG["addition_time_embed_dim"])
    assert y.shape == (BATCH, TINY_UNET_CONFIG["projection_class_embeddings_input_dim"])
    return ms.Tensor(inputs["x"]), ms.Tensor(inputs["t"]), ms.Tensor(inputs["context"]), y


@pytest.fixture(scope="module")
def torch_call(torch_unet, inputs):
    x, t, ctx = (torch.from_numpy(inputs[k]) for k in ("x", "t", "context"))
    cond = {"text_embeds": torch.from_numpy(inputs["pooled"]),
            "time_ids": torch.tensor([sum(SIZES, ())] * BATCH, dtype=torch.float32)}

    def run() -> np.ndarray:
        with torch.no_grad():
            return torch_unet(x, t, ctx, added_cond_kwargs=cond).sample.numpy()
    return run


@pytest.fixture(scope="module")
def reference(torch_call) -> np.ndarray:
    return torch_call()


def _check(out: np.ndarray, reference: np.ndarray) -> None:
    assert out.shape == (BATCH,) + TINY_LATENT_SHAPE[1:]
    assert np.isfinite(out).all()
    err = float(np.abs(out.astype(np.float64) - reference).max() / np.abs(reference).max())
    assert err <= TOL, err


def _bench_ms(benchmark, unet, ms_inputs, reference) -> None:
    def run() -> np.ndarray:
        return unet(*ms_inputs).asnumpy()

    run()  # warm-up: kernel selection (PyNative) or compilation (graph) stays out of the timings
    _check(benchmark(run), reference)


@pytest.mark.benchmark(group=GROUP)
def test_mindspore_unet_pynative(benchmark, sgm_unet_weights, ms_inputs, reference):
    _bench_ms(benchmark, _ms_unet(sgm_unet_weights), ms_inputs, reference)


@pytest.mark.benchmark(group=GROUP)
def test_mindspore_unet_pynative_native_conv(benchmark, sgm_unet_weights, ms_inputs, reference):
    unet = _ms_unet(sgm_unet_weights)
    assert set_conv_impl(unet, "native") > 0
    _bench_ms(benchmark, unet, ms_inputs, reference)


@pytest.mark.benchmark(group=GROUP)
def test_mindspore_unet_graph(benchmark, sgm_unet_weights, ms_inputs, reference):
    _bench_ms(benchmark, compile_for_graph(_ms_unet(sgm_unet_weights)), ms_inputs, reference)


@pytest.mark.benchmark(group=GROUP)
def test_diffusers_unet(benchmark, torch_call, reference):
    torch_call()  # warm-up
    out = benchmark(torch_call)
    assert out.shape == (BATCH,) + TINY_LATENT_SHAPE[1:]
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, reference)  # deterministic
