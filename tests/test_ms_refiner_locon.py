"""The MindSpore port against diffusers for the SDXL refiner's conditioning and for LoCon (conv LoRA).

* refiner: a tiny refiner (OpenCLIP-bigG only, at ``conditioner.embedders.0.model.``; ``y`` ends
  in original size, crop and *aesthetic score*) built with diffusers, weights copied into the
  MindSpore cells by :mod:`lora_parity.convert.fullweights`; every UNet block equals diffusers'
  ``UNet2DConditionModel`` fed by ``StableDiffusionXLImg2ImgPipeline``'s own prompt encoding and
  ``_get_add_time_ids`` (``requires_aesthetics_score=True``); the whole img2img run (negative
  prompt "" encoded, negative score 2.5, ``latents=`` as-is, ``strength``) gives the same image.
  Dropping the score, or the base pipeline's zero negative, is caught.
* LoCon: a LoRA on every convolution of the tiny base UNet, loaded by diffusers'
  ``load_lora_weights`` from the PEFT file :mod:`lora_parity.convert.formats` writes and injected into the
  MindSpore cells, gives the same per-block outputs; merging equals the unmerged computation; a
  spatially flipped ``lora_A`` or a wrong scale on one ResBlock conv is caught.

Thresholds come from :mod:`lora_parity.parity.tolerances`.
"""
from __future__ import annotations

import numpy as np
import pytest

from lora_parity.parity.tolerances import (FAULT_FACTOR, IMAGE_MAE_FP32_TARGET, SAME_FRAMEWORK,
                                    layer_tolerance)

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from lora_parity.parity.align import unet_alignment  # noqa: E402
from lora_parity.backends.port import (build_sdxl, capture_activations, inject_lora,  # noqa: E402
                                            lora_state, merge_lora, sdxl_vector, set_conv_impl, unmerge_lora)
from lora_parity.backends.port.layers import Conv2d  # noqa: E402
from lora_parity.backends.port.sampler import (condition, generate_float,  # noqa: E402
                                                    img2img_first_step)
from lora_parity.backends.diffusers.view import capture, load_lora_checked  # noqa: E402
from lora_parity.fixtures.tiny_pipeline import (SDXL_SCHEDULER_CONFIG, _build_tokenizer,  # noqa: E402
                                                _rerandomize)
from lora_parity.convert.fullweights import (VaeLayout, diffusers_to_sgm, param_maps,  # noqa: E402
                                     sgm_only_params)
from lora_parity.convert.keymap import keymap_for  # noqa: E402
from lora_parity.convert.layout import PRESETS, ModelLayout  # noqa: E402
from lora_parity.sampling import EulerSchedule  # noqa: E402
from lora_parity.convert.tiny import (TINY_REFINER_UNET_CONFIG, TINY_TE2_CONFIG, TINY_UNET_CONFIG,  # noqa: E402
                                      TINY_VAE_CONFIG)
from lora_parity.convert.layout import tiny_refiner_layout  # noqa: E402

pytestmark = pytest.mark.parity

Tensor = ms.Tensor
TOL = layer_tolerance("F32").rel
TIME_DIM = TINY_UNET_CONFIG["addition_time_embed_dim"]
ORIG, CROP, TARGET = (32, 32), (4, 8), (32, 32)
SCORE, NEG_SCORE = 6.0, 2.5
PROMPT = "a photo of a red cube on a wooden table"


def rel_err(a, ref) -> float:
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _cfg(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _state(**models) -> dict[str, np.ndarray]:
    return {f"{comp}.{k}": v.detach().float().numpy() for comp, m in models.items()
            for k, v in m.state_dict().items()}


def _block_pairs(layout: ModelLayout) -> dict[str, str]:
    """SGM block -> the diffusers UNet module (relative name) that ends it, from the key map."""
    return {a.sgm: a.diffusers[len("unet."):] for a in unet_alignment(layout)}


def _unet_blocks_torch(unet, pairs, latents, t, context, text_embeds, time_ids):
    with capture(unet, sorted(set(pairs.values()))) as got, torch.no_grad():
        out = unet(torch.from_numpy(latents), torch.from_numpy(t), context,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    return {sgm: got[dif] for sgm, dif in pairs.items()}, out.numpy()


def _unet_blocks_ms(unet, latents, t, context, y):
    with capture_activations(unet) as acts:
        out = unet(Tensor(latents), Tensor(t), context, y).asnumpy()
    return acts, out


def _block_errors(acts, ref_blocks, out, ref_out) -> dict[str, float]:
    errs = {sgm: rel_err(acts[sgm], ref) for sgm, ref in ref_blocks.items()}
    errs["unet out"] = rel_err(out, ref_out)
    return errs


def _fmt(errs: dict[str, float]) -> str:
    worst = max(errs, key=errs.get)
    return f"max {errs[worst]:.2e} at {worst} over {len(errs)} points"


# --------------------------------------------------------------------------- refiner

@pytest.fixture(scope="module")
def refiner_layout() -> ModelLayout:
    """TE2-only context, attention on the middle level only, depth 2, y = pooled + 5 numbers."""
    layout = tiny_refiner_layout()
    assert layout.unet.transformer_depth[0] == 0 and layout.unet.transformer_depth_middle == 2
    assert [te.sgm_prefix for te in layout.text_encoders] == ["conditioner.embedders.0.model."]
    return layout


@pytest.fixture(scope="module")
def refiner_pipe():
    """diffusers' img2img pipeline as the official refiner configures it, on tiny random weights."""
    gen = torch.Generator().manual_seed(21)
    unet = diffusers.UNet2DConditionModel(**_cfg(TINY_REFINER_UNET_CONFIG))
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_TE2_CONFIG))
    vae = diffusers.AutoencoderKL(**_cfg(TINY_VAE_CONFIG))
    for m in (unet, te2, vae):
        _rerandomize(m, gen)
        m.eval()
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=_build_tokenizer("!"),
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


@pytest.fixture(scope="module")
def refiner_ms(refiner_layout, refiner_pipe):
    """The MindSpore port of the same refiner, weights through the full-weight converter (strict)."""
    sd = _state(unet=refiner_pipe.unet, text_encoder_2=refiner_pipe.text_encoder_2, vae=refiner_pipe.vae)
    maps = param_maps(refiner_layout, VaeLayout.from_diffusers_config(TINY_VAE_CONFIG))
    sgm = diffusers_to_sgm(sd, maps)
    sgm.update(sgm_only_params(refiner_layout))
    assert any(k.startswith("conditioner.embedders.0.model.") for k in sgm)
    assert not any(k.startswith("conditioner.embedders.1.") for k in sgm)
    comps = build_sdxl(refiner_layout, (TINY_TE2_CONFIG,), TINY_VAE_CONFIG)
    assert comps.load(sgm, strict=True) == ([], [])
    return comps


def _tokens(pipe, text: str) -> np.ndarray:
    tok = pipe.tokenizer_2
    return tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="np").input_ids.astype(np.int64)


def _latents(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 16, 16)).astype(np.float32)


def test_aesthetic_conditioning_is_derived_from_the_layout(refiner_ms):
    """uses_aesthetic_score follows adm_in_channels; a missing or superfluous score is a clear error."""
    assert refiner_ms.uses_aesthetic_score and refiner_ms.time_id_count == 5
    from lora_parity.convert.layout import tiny_layout

    base = build_sdxl(tiny_layout(), vae_config=None, configure_runtime=False)
    assert not base.uses_aesthetic_score and base.time_id_count == 6
    # full size, no initializer run (nothing allocated; without it MindSpore fills every parameter)
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        assert build_sdxl(PRESETS["sdxl-refiner"], vae_config=None, configure_runtime=False).uses_aesthetic_score
        assert not build_sdxl(PRESETS["sdxl-base"], vae_config=None, configure_runtime=False).uses_aesthetic_score

    pooled = Tensor(np.ones((1, 32), np.float32))
    adm_ref, adm_base = TINY_REFINER_UNET_CONFIG["projection_class_embeddings_input_dim"], 6 * TIME_DIM + 32
    with pytest.raises(ValueError, match="aesthetic score"):
        sdxl_vector(pooled, ORIG, CROP, TARGET, TIME_DIM, adm_in_channels=adm_ref)
    with pytest.raises(ValueError, match="no aesthetic-score"):
        sdxl_vector(pooled, ORIG, CROP, TARGET, TIME_DIM, aesthetic_score=6.0, adm_in_channels=adm_base)
    with pytest.raises(ValueError, match="not 6"):
        sdxl_vector(pooled, ORIG, CROP, TARGET, TIME_DIM, adm_in_channels=adm_base + 3)
    assert sdxl_vector(pooled, ORIG, CROP, None, TIME_DIM, aesthetic_score=6.0,
                       adm_in_channels=adm_ref).shape == (1, adm_ref)
    ids = [Tensor(np.zeros((1, 77), np.int64))]
    with pytest.raises(ValueError, match="aesthetic score"):
        refiner_ms.conditioning(ids, ORIG, CROP, TARGET)
    with pytest.raises(ValueError, match="negative_ids"):
        condition(refiner_ms, ids, (ORIG, CROP, TARGET))  # the refiner encodes its negative prompt


@pytest.fixture(scope="module")
def refiner_unet_case(refiner_pipe, refiner_ms, refiner_layout):
    """diffusers' conditioning for [negative "", prompt] and the UNet's per-block outputs on it."""
    pipe = refiner_pipe
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(prompt=PROMPT, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=True, negative_prompt=None)
    add, add_neg = pipe._get_add_time_ids(ORIG, CROP, TARGET, SCORE, NEG_SCORE, ORIG, (0, 0), TARGET,
                                          dtype=torch.float32,
                                          text_encoder_projection_dim=TINY_TE2_CONFIG["projection_dim"])
    assert add.shape[-1] == 5 and add[0, -1].item() == SCORE and add_neg[0, -1].item() == NEG_SCORE
    context = torch.cat([npe, pe])
    text_embeds = torch.cat([nppe, ppe])
    time_ids = torch.cat([add_neg, add])
    latents = _latents(3, 2)
    t = np.array([437.0, 437.0], np.float32)
    pairs = _block_pairs(refiner_layout)
    blocks, out = _unet_blocks_torch(pipe.unet, pairs, latents, t, context, text_embeds, time_ids)
    with torch.no_grad():
        y_ref = torch.cat([text_embeds, pipe.unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], -1)

    ctx, y, negative = condition(refiner_ms, [_tokens(pipe, PROMPT)], (ORIG, CROP, TARGET),
                                 negative_ids=[_tokens(pipe, "")])
    ms_ctx = ms.ops.concat([negative[0], ctx], axis=0)
    ms_y = ms.ops.concat([negative[1], y], axis=0)
    return {"context": (ms_ctx, context.numpy()), "y": (ms_y, y_ref.numpy()), "latents": latents, "t": t,
            "blocks": blocks, "out": out}


def test_refiner_unet_blocks_match_diffusers_with_aesthetic_score(refiner_ms, refiner_unet_case):
    case = refiner_unet_case
    errs = {"context": rel_err(case["context"][0].asnumpy(), case["context"][1]),
            "y": rel_err(case["y"][0].asnumpy(), case["y"][1])}
    acts, out = _unet_blocks_ms(refiner_ms.unet, case["latents"], case["t"], case["context"][0], case["y"][0])
    errs.update(_block_errors(acts, case["blocks"], out, case["out"]))
    print(f"\nrefiner (negative '' + prompt, score {SCORE}/{NEG_SCORE}): {_fmt(errs)}")
    assert max(errs.values()) <= TOL, errs


def test_dropping_the_aesthetic_score_is_caught(refiner_ms, refiner_unet_case):
    """Zeroing the score's sinusoid in y (what a pipeline that forgets it feeds) fails by far."""
    case = refiner_unet_case
    y = case["y"][0]
    y_fault = ms.ops.concat([y[:, :-TIME_DIM], ms.ops.zeros_like(y[:, -TIME_DIM:])], axis=-1)
    acts, out = _unet_blocks_ms(refiner_ms.unet, case["latents"], case["t"], case["context"][0], y_fault)
    errs = _block_errors(acts, case["blocks"], out, case["out"])
    print(f"\nscore dropped: {_fmt(errs)}")
    assert errs["unet out"] > FAULT_FACTOR * TOL, errs
    assert errs["model.diffusion_model.label_emb"] > FAULT_FACTOR * TOL


def test_refiner_img2img_image_matches_diffusers(refiner_pipe, refiner_ms):
    """The whole refiner run: CFG with "" encoded as negative, score 6/2.5, latents as-is, strength 0.5.

    And the base pipeline's zero negative (``force_zeros_for_empty_prompt``) used by mistake for the
    refiner moves the image far past the threshold.
    """
    steps, strength, guidance = 4, 0.5, 5.0
    latents = _latents(5)
    with torch.no_grad():
        ref = refiner_pipe(prompt=PROMPT, image=torch.from_numpy(latents), latents=torch.from_numpy(latents),
                           strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                           original_size=ORIG, crops_coords_top_left=CROP, target_size=TARGET,
                           aesthetic_score=SCORE, negative_aesthetic_score=NEG_SCORE, output_type="np").images[0]
    schedule = EulerSchedule.from_config(SDXL_SCHEDULER_CONFIG, steps)
    kwargs = dict(scale_initial_noise=False, first_step=img2img_first_step(steps, strength))
    assert kwargs["first_step"] == 2
    ids = [_tokens(refiner_pipe, PROMPT)]
    image, _ = generate_float(refiner_ms, ids, latents, schedule, guidance, (ORIG, CROP, TARGET),
                              negative_ids=[_tokens(refiner_pipe, "")], **kwargs)
    mae = float(np.abs(image - ref).mean() * 255)
    zero_neg, _ = generate_float(refiner_ms, ids, latents, schedule, guidance, (ORIG, CROP, TARGET),
                                 force_zeros_for_empty_prompt=True, **kwargs)
    fault_mae = float(np.abs(zero_neg - ref).mean() * 255)
    print(f"\nrefiner img2img image: MAE {mae:.2e} (0-255), max rel {rel_err(image, ref):.2e}; "
          f"zero negative instead of '': MAE {fault_mae:.2f}")
    assert mae <= IMAGE_MAE_FP32_TARGET
    assert fault_mae > FAULT_FACTOR * IMAGE_MAE_FP32_TARGET


# --------------------------------------------------------------------------- LoCon

@pytest.fixture(scope="module")
def base_case(tiny_pipeline_dir, tiny_layout):
    """The tiny base pipeline (diffusers) and its UNet in MindSpore cells, same weights."""
    from lora_parity.backends.port import UNetModel, load_params
    from lora_parity.fixtures.bundle import sgm_weights_from_pipeline

    sgm = sgm_weights_from_pipeline(tiny_pipeline_dir)
    unet = UNetModel(tiny_layout.unet)
    assert load_params(unet, {k: v for k, v in sgm.items() if k.startswith("model.diffusion_model.")}) == []
    rng = np.random.default_rng(17)
    inputs = {"latents": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
              "t": np.array([437.0, 12.0], np.float32),
              "context": rng.standard_normal((2, 77, TINY_UNET_CONFIG["cross_attention_dim"])).astype(np.float32),
              "pooled": rng.standard_normal((2, TINY_TE2_CONFIG["projection_dim"])).astype(np.float32)}
    return {"sgm": sgm, "unet": unet, "inputs": inputs}


def _conv_lora(layout, rank=4, alpha=8.0, seed=23):
    from lora_parity.fixtures.synthetic import make_lora

    convs = [e.sgm for e in keymap_for(layout).lora_entries("unet") if e.kind == "conv"]
    return make_lora(layout, rank=rank, alpha=alpha, modules=convs, seed=seed, b_std=0.1), convs


def _ms_lora_tensors(lora) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    from lora_parity.convert.formats import tensors_for

    tensors = {k: t.to_float("float32") for k, t in tensors_for(lora, "ms")[0].items()}
    return tensors, {p.module.sgm: p.alpha for p in lora.pairs.values()}


def _fresh_unet(base_case, tiny_layout):
    from lora_parity.backends.port import UNetModel, load_params

    unet = UNetModel(tiny_layout.unet)
    load_params(unet, {p.name: p.asnumpy() for p in base_case["unet"].get_parameters()})
    return unet


def _locon_float64(conv: Conv2d, x: np.ndarray) -> np.ndarray:
    """The exact LoCon output of ``conv`` (unmerged weights) on ``x``, in float64 torch."""
    F = torch.nn.functional
    t = lambda p: torch.from_numpy(p.asnumpy().astype(np.float64))  # noqa: E731
    xd = torch.from_numpy(x.astype(np.float64))
    base = F.conv2d(xd, t(conv.weight), t(conv.bias), stride=conv.stride, padding=conv.padding)
    low = F.conv2d(F.conv2d(xd, t(conv.lora_A.weight), stride=conv.stride, padding=conv.padding),
                   t(conv.lora_B.weight))
    return (base + conv.lora_scale * low).numpy()


def _ms_inputs(inp):
    y = sdxl_vector(Tensor(inp["pooled"]), (32, 32), (0, 0), (32, 32), TIME_DIM)
    return Tensor(inp["context"]), y


@pytest.fixture(scope="module")
def locon_reference(tmp_path_factory, tiny_pipeline_dir, tiny_layout, base_case):
    """diffusers with the conv LoRA loaded from our PEFT file: per-block outputs."""
    from lora_parity.convert import formats

    lora, convs = _conv_lora(tiny_layout)
    path = tmp_path_factory.mktemp("locon") / "locon_peft.safetensors"
    formats.write(path, lora, "peft")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    report = load_lora_checked(pipe, path)
    assert len(report.loaded) == 2 * len(convs)  # every lora_A / lora_B landed
    kinds = {type(m.lora_A["parity"]).__name__ for _, m in pipe.unet.named_modules()
             if hasattr(m, "lora_A") and "parity" in getattr(m, "lora_A", {})}
    assert kinds == {"Conv2d"}
    inp = base_case["inputs"]
    time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32)
    blocks, out = _unet_blocks_torch(pipe.unet, _block_pairs(tiny_layout), inp["latents"], inp["t"],
                                     torch.from_numpy(inp["context"]), torch.from_numpy(inp["pooled"]), time_ids)
    with torch.no_grad():
        pipe.unet.disable_adapters()
        plain = pipe.unet(torch.from_numpy(inp["latents"]), torch.from_numpy(inp["t"]),
                          torch.from_numpy(inp["context"]),
                          added_cond_kwargs={"text_embeds": torch.from_numpy(inp["pooled"]),
                                             "time_ids": time_ids}).sample.numpy()
    return {"lora": lora, "convs": convs, "blocks": blocks, "out": out, "plain": plain}


def test_locon_all_convs_match_diffusers_peft(base_case, tiny_layout, locon_reference):
    ref = locon_reference
    unet = _fresh_unet(base_case, tiny_layout)
    tensors, alphas = _ms_lora_tensors(ref["lora"])
    report = inject_lora(unet, tensors, alphas)
    assert sorted(report.wrapped) == sorted(ref["convs"])
    assert set(report.scales.values()) == {2.0}
    assert {k: v.shape for k, v in lora_state(unet).items()} == {k: v.shape for k, v in tensors.items()}
    context, y = _ms_inputs(base_case["inputs"])
    inp = base_case["inputs"]
    acts, out = _unet_blocks_ms(unet, inp["latents"], inp["t"], context, y)
    errs = _block_errors(acts, ref["blocks"], out, ref["out"])
    effect = rel_err(ref["plain"], ref["out"])
    print(f"\nLoCon on {len(ref['convs'])} convs vs diffusers PEFT: {_fmt(errs)}; LoRA moves the output by {effect:.2e}")
    assert max(errs.values()) <= TOL, errs
    assert effect > FAULT_FACTOR * TOL  # the LoRA does something

    # merged vs unmerged: the folded kernels equal W + scale * (B (x) A) within SAME_FRAMEWORK.  Their
    # outputs cannot: a float32 conv summing up to 9 * 192 products is itself ~1e-6 (relative to its
    # max) from the float64 result, merged or not (measured 1.0e-6 / 1.1e-6 per conv here), so each
    # conv on the input it really sees, and the UNet output, are held to the float32 layer bar
    lora_convs = {id(c): c for _, c in unet.cells_and_names() if isinstance(c, Conv2d) and c.lora_A is not None}
    assert len(lora_convs) == len(ref["convs"])
    seen: list[tuple[Conv2d, np.ndarray]] = []
    handles = [c.register_forward_pre_hook(lambda cell, args: seen.append((cell, args[0].asnumpy())))
               for c in lora_convs.values()]
    unet(Tensor(inp["latents"]), Tensor(inp["t"]), context, y)
    for h in handles:
        h.remove()
    assert {id(c) for c, _ in seen} == set(lora_convs)
    exact = [_locon_float64(c, x) for c, x in seen]
    unmerged_err = max(rel_err(c(Tensor(x)).asnumpy(), e) for (c, x), e in zip(seen, exact))
    assert merge_lora(unet) == len(ref["convs"])
    merged_err = max(rel_err(c(Tensor(x)).asnumpy(), e) for (c, x), e in zip(seen, exact))
    conv_err = max(unmerged_err, merged_err)
    print(f"\nper conv vs float64: unmerged {unmerged_err:.2e}, merged {merged_err:.2e}")
    merged = unet(Tensor(inp["latents"]), Tensor(inp["t"]), context, y).asnumpy()
    err_merged = rel_err(merged, out)
    # the folded kernels themselves: W + scale * (B (x) A) in float64, stored float32
    w = {p.name: p.asnumpy() for p in unet.get_parameters()}
    base_w = {p.name: p.asnumpy() for p in base_case["unet"].get_parameters()}
    w_err = 0.0
    for layer in ref["convs"]:
        a, b = tensors[layer + ".lora_A.weight"], tensors[layer + ".lora_B.weight"]
        folded = base_w[layer + ".weight"].astype(np.float64) + 2.0 * np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        w_err = max(w_err, rel_err(w[layer + ".weight"], folded.astype(np.float32)))
    print(f"merged vs unmerged: per conv {conv_err:.2e}, UNet output {err_merged:.2e}; folded kernels {w_err:.2e}; "
          f"merged vs diffusers {rel_err(merged, ref['out']):.2e}")
    assert w_err <= SAME_FRAMEWORK.rel
    assert conv_err <= TOL
    assert err_merged <= TOL
    assert rel_err(merged, ref["out"]) <= TOL
    assert unmerge_lora(unet) == len(ref["convs"])
    # W + delta - delta rounds twice in float32: not bitwise, hence the F32 bar
    assert rel_err(unet(Tensor(inp["latents"]), Tensor(inp["t"]), context, y).asnumpy(), out) <= TOL


@pytest.mark.parametrize("impl", ["im2col", "native"])
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1)])
def test_locon_conv_cell_matches_torch(impl, k, stride):
    """One LoCon conv (both conv implementations) against the PEFT formula in torch, and merged."""
    from lora_parity.backends.port.layers import Recordable

    class One(Recordable):
        def __init__(self):
            super().__init__("m.")
            self.conv = Conv2d(8, 16, k, stride, impl=impl)
            self._finish()

        def construct(self, x):
            return self.conv(x)

    rng = np.random.default_rng(k * 10 + stride)
    w = rng.standard_normal((16, 8, k, k)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    a = rng.standard_normal((4, 8, k, k)).astype(np.float32)
    b = rng.standard_normal((16, 4, 1, 1)).astype(np.float32)
    x = rng.standard_normal((2, 8, 9, 10)).astype(np.float32)
    net = One()
    ms.load_param_into_net(net, {n: ms.Parameter(Tensor(v), name=n) for n, v in
                                 (("m.conv.weight", w), ("m.conv.bias", bias))})
    inject_lora(net, {"m.conv.lora_A.weight": a, "m.conv.lora_B.weight": b}, alpha=2.0)
    assert net.conv.lora_A.impl == impl and net.conv.lora_A.stride == stride
    F = torch.nn.functional
    tx = torch.from_numpy(x)
    ref = (F.conv2d(tx, torch.from_numpy(w), torch.from_numpy(bias), stride=stride, padding=k // 2)
           + 0.5 * F.conv2d(F.conv2d(tx, torch.from_numpy(a), stride=stride, padding=k // 2),
                            torch.from_numpy(b))).numpy()
    unmerged = net(Tensor(x)).asnumpy()
    merge_lora(net)
    merged = net(Tensor(x)).asnumpy()
    assert rel_err(unmerged, ref) <= SAME_FRAMEWORK.rel
    assert rel_err(merged, ref) <= SAME_FRAMEWORK.rel


@pytest.mark.parametrize("fault", ["flipped_lora_A", "scale_off"])
def test_locon_fault_on_one_resblock_conv_is_caught(base_case, tiny_layout, locon_reference, fault):
    ref = locon_reference
    unet = _fresh_unet(base_case, tiny_layout)
    tensors, alphas = _ms_lora_tensors(ref["lora"])
    layer = "model.diffusion_model.input_blocks.1.0.in_layers.2"
    assert layer in ref["convs"]
    if fault == "flipped_lora_A":
        key = layer + ".lora_A.weight"
        tensors[key] = np.ascontiguousarray(tensors[key][:, :, ::-1, ::-1])
    else:
        alphas = {**alphas, layer: alphas[layer] * 2.0}
    inject_lora(unet, tensors, alphas)
    context, y = _ms_inputs(base_case["inputs"])
    inp = base_case["inputs"]
    acts, out = _unet_blocks_ms(unet, inp["latents"], inp["t"], context, y)
    errs = _block_errors(acts, ref["blocks"], out, ref["out"])
    print(f"\nLoCon fault {fault} on {layer}: {_fmt(errs)}")
    assert errs["model.diffusion_model.input_blocks.1"] > FAULT_FACTOR * TOL, errs
    assert errs["unet out"] > FAULT_FACTOR * TOL


def test_locon_native_conv_unet_matches_default(base_case, tiny_layout, locon_reference):
    """The whole LoCon UNet with MindSpore's own Conv2D kernel equals the im2col path (F32 bar)."""
    unet = _fresh_unet(base_case, tiny_layout)
    inject_lora(unet, *_ms_lora_tensors(locon_reference["lora"]))
    context, y = _ms_inputs(base_case["inputs"])
    inp = base_case["inputs"]
    default = unet(Tensor(inp["latents"]), Tensor(inp["t"]), context, y).asnumpy()
    n = set_conv_impl(unet, "native")
    assert n == len([c for _, c in unet.cells_and_names() if isinstance(c, Conv2d)])
    native = unet(Tensor(inp["latents"]), Tensor(inp["t"]), context, y).asnumpy()
    print(f"\nLoCon UNet native vs im2col: {rel_err(native, default):.2e}; "
          f"native vs diffusers {rel_err(native, locon_reference['out']):.2e}")
    assert rel_err(native, default) <= TOL
    assert rel_err(native, locon_reference["out"]) <= TOL


def test_locon_unet_runs_in_graph_mode(base_case, tiny_layout, locon_reference):
    """Graph mode compiles the LoCon convs (unrolled ``lora_A is not None`` branch) and equals PyNative;
    merging recompiles (the structure key sees ``lora_merged``)."""
    from lora_parity.backends.port import compile_for_graph

    unet = _fresh_unet(base_case, tiny_layout)
    inject_lora(unet, *_ms_lora_tensors(locon_reference["lora"]))
    context, y = _ms_inputs(base_case["inputs"])
    args = (Tensor(base_case["inputs"]["latents"]), Tensor(base_case["inputs"]["t"]), context, y)
    pynative = unet(*args).asnumpy()
    compile_for_graph(unet)
    graph = unet(*args).asnumpy()
    merge_lora(unet)
    graph_merged = unet(*args).asnumpy()
    compile_for_graph(unet, False)
    errs = {"graph vs pynative": rel_err(graph, pynative), "graph merged vs pynative": rel_err(graph_merged, pynative),
            "graph vs diffusers": rel_err(graph, locon_reference["out"])}
    print("\nLoCon graph mode:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["graph vs pynative"] <= SAME_FRAMEWORK.rel
    assert errs["graph merged vs pynative"] <= TOL and errs["graph vs diffusers"] <= TOL
