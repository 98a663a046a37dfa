"""The MindSpore SDXL cells (lora_parity.backends.port) against diffusers / transformers.

* names: the cells' parameter names and shapes are exactly the SGM / MindONE checkpoint
  names that diffusers' weights map to (tiny config with real weights; sdxl-base
  on torch's meta device, names and shapes only);
* numerics: random tiny diffusers models, converted to SGM names by the small private
  mapping below and loaded with ``mindspore.load_param_into_net``, give the same
  outputs in float32 (relative error = max |ms - torch| / max |torch| <= 1e-5);
* LoRA: unmerged MindONE-style LoRA equals folding ``scale * B @ A`` into the weight.
"""
from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

from lora_parity.parity.tolerances import SAME_FRAMEWORK, layer_tolerance

torch = pytest.importorskip("torch")
ms = pytest.importorskip("mindspore")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from lora_parity.errors import LoraParityError  # noqa: E402
from lora_parity.convert.layout import (CLIP_BIGG_CONFIG, CLIP_L_CONFIG, PRESETS, SDXL_BASE_UNET_CONFIG,  # noqa: E402
                                SDXL_REFINER_UNET_CONFIG, UNetLayout, sdxl_text_encoders)
from lora_parity.convert.tiny import (TINY_LATENT_SHAPE, TINY_TE1_CONFIG, TINY_TE2_CONFIG,  # noqa: E402
                              TINY_UNET_CONFIG, TINY_VAE_CONFIG)
from lora_parity.backends.port import (  # noqa: E402
    HFCLIPTextEncoder, OpenCLIPTextEncoder, UNetModel, VAEDecoder, build_text_encoder,
    capture_activations, configure_cpu, inject_lora, lora_state, lora_targets, merge_lora, param_shapes,
    sdxl_vector, unmerge_lora, use_numerics)
from lora_parity.backends.port.model import SDXL_VAE_CONFIG  # noqa: E402

pytestmark = pytest.mark.parity

Tensor = ms.Tensor
TOL = layer_tolerance("F32").rel
SEQ = 77
SIZES = ((32, 32), (0, 0), (32, 32))  # original size, crop top-left, target size


def rel_err(a, ref) -> float:
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# --------------------------------------------------------------------------- private diffusers -> SGM map
# Minimal, for these tests only (the project's full converter lives elsewhere).

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_NORM_LEAF = {"weight": "gamma", "bias": "beta"}


def _unet_module(mod: str, nrb: int, up_has_attn: set[int]) -> str:
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if mod in fixed:
        return fixed[mod]

    def sub(kind: str, rest: str) -> str:
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            return _RESNET[head] + (f".{tail}" if tail else "")
        return rest

    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", mod)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + i * (nrb + 1) + j}.{0 if kind == 'resnets' else 1}.{sub(kind, rest)}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", mod)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (nrb + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", mod)
    if m:
        idx = 1 if m[1] == "attentions" else (0 if m[2] == "0" else 2)
        return f"middle_block.{idx}.{sub(m[1], m[3])}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", mod)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{i * (nrb + 1) + j}.{0 if kind == 'resnets' else 1}.{sub(kind, rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", mod)
    if m:
        i = int(m[1])
        return f"output_blocks.{i * (nrb + 1) + nrb}.{2 if i in up_has_attn else 1}.conv"
    raise KeyError(mod)


def _norm_modules(model) -> set[str]:
    kinds = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    return {n for n, m in model.named_modules() if isinstance(m, kinds)}


def unet_to_sgm(unet, nrb: int) -> dict[str, torch.Tensor]:
    norms = _norm_modules(unet)
    up_attn = {int(m[1]) for n, _ in unet.named_modules()
               if (m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.0", n))}
    out = {}
    for k, v in unet.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        leaf = _NORM_LEAF[leaf] if mod in norms else leaf
        out[f"model.diffusion_model.{_unet_module(mod, nrb, up_attn)}.{leaf}"] = v
    return out


def hf_clip_to_sgm(model, prefix: str = "conditioner.embedders.0.transformer.") -> dict[str, torch.Tensor]:
    norms = _norm_modules(model)
    out = {}
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in norms:
            leaf = _NORM_LEAF[leaf]
        elif mod.endswith("_embedding"):
            leaf = "embedding_table"
        # transformers 5 keeps CLIPTextModel's modules at top level; checkpoints say "text_model."
        mod = mod if mod.startswith("text_model.") else "text_model." + mod
        out[f"{prefix}{mod}.{leaf}"] = v
    return out


def openclip_to_sgm(model, prefix: str = "conditioner.embedders.1.model.") -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` -> OpenCLIP names (fused q/k/v, transposed projection)."""
    sd = model.state_dict()
    n_layers = model.config.num_hidden_layers
    tm = "text_model."
    out = {
        prefix + "token_embedding.embedding_table": sd[tm + "embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd[tm + "embeddings.position_embedding.weight"],
        prefix + "ln_final.gamma": sd[tm + "final_layer_norm.weight"],
        prefix + "ln_final.beta": sd[tm + "final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T,
        prefix + "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for i in range(n_layers):
        src, dst = f"{tm}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"], 0)
            out[f"{dst}attn.out_proj.{leaf}"] = sd[f"{src}self_attn.out_proj.{leaf}"]
            out[f"{dst}mlp.c_fc.{leaf}"] = sd[f"{src}mlp.fc1.{leaf}"]
            out[f"{dst}mlp.c_proj.{leaf}"] = sd[f"{src}mlp.fc2.{leaf}"]
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[f"{dst}{b}.gamma"] = sd[f"{src}{a}.weight"]
            out[f"{dst}{b}.beta"] = sd[f"{src}{a}.bias"]
    return out


def vae_decoder_to_sgm(vae, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    norms = _norm_modules(vae)
    n_up = len(vae.decoder.up_blocks)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in vae.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if not (mod.startswith("decoder.") or mod == "post_quant_conv"):
            continue
        new_leaf = _NORM_LEAF[leaf] if mod in norms else leaf
        name = mod
        m = re.fullmatch(r"decoder\.mid_block\.resnets\.(\d)\.(.+)", mod)
        if m:
            name = f"decoder.mid.block_{int(m[1]) + 1}.{m[2]}"
        m = re.fullmatch(r"decoder\.mid_block\.attentions\.0\.(.+)", mod)
        if m:
            name = f"decoder.mid.attn_1.{attn[m[1]]}"
            if v.ndim == 2:  # Linear -> 1x1 conv
                v = v[:, :, None, None]
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", mod)
        if m:
            rest = m[3].replace("conv_shortcut", "nin_shortcut")
            name = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{rest}"
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", mod)
        if m:
            name = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv"
        name = {"decoder.conv_norm_out": "decoder.norm_out"}.get(name, name)
        out[f"{prefix}{name}.{new_leaf}"] = v
    return out


def to_ms_params(sd: dict[str, torch.Tensor]) -> dict:
    return {k: ms.Parameter(Tensor(v.detach().float().numpy().copy()), name=k) for k, v in sd.items()}


def load_exact(cell, sd: dict[str, torch.Tensor]) -> None:
    """Load and assert nothing is missing or unexpected."""
    net_names = {p.name for p in cell.get_parameters()}
    assert net_names == set(sd), (sorted(net_names - set(sd))[:5], sorted(set(sd) - net_names)[:5])
    not_loaded, unused = ms.load_param_into_net(cell, to_ms_params(sd), strict_load=True)
    assert not not_loaded and not unused


def randomize_(model, seed: int) -> None:
    """Re-draw every parameter (diffusers zero-inits several layers) at a sane scale."""
    g = torch.Generator().manual_seed(seed)
    norms = _norm_modules(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mod, _, leaf = name.rpartition(".")
            noise = torch.randn(p.shape, generator=g)
            if mod in norms:
                p.copy_(1.0 + 0.2 * noise if leaf == "weight" else 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def _mindspore_cpu():
    configure_cpu()  # PyNative, ops launched synchronously: ~10x faster on 2 cores


@pytest.fixture(scope="module", autouse=True)
def _diffusers_numerics():
    """These tests hold the port to diffusers at 1e-5: its "diffusers" numerics (the default,
    "mindone", computes as MindONE's gm does; tests/test_port_numerics.py covers it)."""
    with use_numerics("diffusers"):
        yield


def _hf_config(cfg: dict):
    return transformers.CLIPTextConfig(**cfg)


@pytest.fixture(scope="module")
def tiny_unet_layout() -> UNetLayout:
    return UNetLayout.from_diffusers_config(TINY_UNET_CONFIG)


@pytest.fixture(scope="module")
def te_layouts():
    return sdxl_text_encoders(TINY_TE1_CONFIG, TINY_TE2_CONFIG)


@pytest.fixture(scope="module")
def torch_models():
    cfg = {k: v for k, v in TINY_UNET_CONFIG.items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**cfg).eval()
    randomize_(unet, 1)
    te1 = transformers.CLIPTextModel(_hf_config(TINY_TE1_CONFIG)).eval()
    randomize_(te1, 2)
    te2 = transformers.CLIPTextModelWithProjection(_hf_config(TINY_TE2_CONFIG)).eval()
    randomize_(te2, 3)
    vcfg = {k: v for k, v in TINY_VAE_CONFIG.items() if not k.startswith("_")}
    vae = diffusers.AutoencoderKL(**vcfg).eval()
    randomize_(vae, 4)
    return {"unet": unet, "te1": te1, "te2": te2, "vae": vae}


@pytest.fixture(scope="module")
def ms_models(torch_models, tiny_unet_layout, te_layouts):
    unet = UNetModel(tiny_unet_layout)
    load_exact(unet, unet_to_sgm(torch_models["unet"], tiny_unet_layout.layers_per_block))
    te1 = build_text_encoder(te_layouts[0], TINY_TE1_CONFIG)
    load_exact(te1, hf_clip_to_sgm(torch_models["te1"]))
    te2 = build_text_encoder(te_layouts[1], TINY_TE2_CONFIG)
    load_exact(te2, openclip_to_sgm(torch_models["te2"]))
    vae = VAEDecoder.from_diffusers_config(TINY_VAE_CONFIG)
    load_exact(vae, vae_decoder_to_sgm(torch_models["vae"]))
    return {"unet": unet, "te1": te1, "te2": te2, "vae": vae}


@pytest.fixture(scope="module")
def token_ids() -> np.ndarray:
    """Two prompts: BOS 512, random tokens, EOS 513, EOS padding (EOS is also the largest id)."""
    rng = np.random.default_rng(7)
    ids = np.full((2, SEQ), 513, dtype=np.int64)
    ids[:, 0] = 512
    for row, n in zip(ids, (9, 30)):
        row[1: n + 1] = rng.integers(0, 512, n)
    return ids


@pytest.fixture(scope="module")
def torch_cond(torch_models, token_ids):
    ids = torch.from_numpy(token_ids)
    with torch.no_grad():
        o1 = torch_models["te1"](ids, output_hidden_states=True)
        o2 = torch_models["te2"](ids, output_hidden_states=True)
    context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([sum(SIZES, ())] * ids.shape[0], dtype=torch.float32)
    return {"te1_hidden": o1.hidden_states[-2], "te1_pooled": o1.pooler_output,
            "te2_hidden": o2.hidden_states[-2], "te2_pooled": o2.text_embeds,
            "context": context, "time_ids": time_ids}


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((2,) + TINY_LATENT_SHAPE[1:]).astype(np.float32)


TIMESTEPS = np.array([437.0, 12.0], dtype=np.float32)


def _best_time(fn, runs: int = 3) -> float:
    fn()  # warm-up (MindSpore compiles kernels on first use)
    best = math.inf
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _ms_unet_inputs(ms_models, token_ids):
    h1, _ = ms_models["te1"](Tensor(token_ids.astype(np.int32)))
    h2, pooled = ms_models["te2"](Tensor(token_ids.astype(np.int32)))
    context = ms.ops.concat((h1, h2), axis=-1)
    y = sdxl_vector(pooled, *SIZES, dim=TINY_UNET_CONFIG["addition_time_embed_dim"])
    return context, y


# --------------------------------------------------------------------------- names and shapes

def test_tiny_names_and_shapes_match_sgm(torch_models, ms_models):
    """Every cell holds exactly the SGM names diffusers' weights map to, with the same shapes."""
    expected = {}
    expected.update(unet_to_sgm(torch_models["unet"], TINY_UNET_CONFIG["layers_per_block"]))
    expected.update(hf_clip_to_sgm(torch_models["te1"]))
    expected.update(openclip_to_sgm(torch_models["te2"]))
    expected.update(vae_decoder_to_sgm(torch_models["vae"]))
    got = {}
    for cell in ms_models.values():
        pn = [n for n, _ in cell.parameters_and_names()]
        assert pn == [p.name for p in cell.get_parameters()]  # both spellings agree
        got.update({p.name: tuple(p.shape) for p in cell.get_parameters()})
    assert set(got) == set(expected)
    assert all(got[k] == tuple(v.shape) for k, v in expected.items())
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in got  # upsample after attention
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in got
    assert not any("position_ids" in k for k in got)


def test_sdxl_base_names_and_shapes_match_diffusers_meta():
    """Full-size SDXL base: names/shapes from the same cells (lazy weights) vs diffusers on meta."""
    t0 = time.perf_counter()
    shapes = param_shapes(PRESETS["sdxl-base"])
    build_s = time.perf_counter() - t0
    assert build_s < 60
    attn = [k[: -len(".weight")] for k in shapes
            if re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$", k)]
    assert len(attn) == 560
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q" in attn
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in shapes
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            **{k: v for k, v in SDXL_BASE_UNET_CONFIG.items() if not k.startswith("_")})
        te1 = transformers.CLIPTextModel(_hf_config({**CLIP_L_CONFIG, "vocab_size": 49408}))
        te2 = transformers.CLIPTextModelWithProjection(_hf_config({**CLIP_BIGG_CONFIG, "vocab_size": 49408}))
        vae = diffusers.AutoencoderKL(**SDXL_VAE_CONFIG)
    expected = {}
    expected.update(unet_to_sgm(unet, 2))
    expected.update(hf_clip_to_sgm(te1))
    expected.update(openclip_to_sgm(te2))
    expected.update(vae_decoder_to_sgm(vae))
    assert set(shapes) == set(expected)
    assert all(shapes[k] == tuple(v.shape) for k, v in expected.items())


def test_sdxl_refiner_names_and_shapes_match_diffusers_meta():
    """The refiner: 4 levels, no CLIP-L, bigG at conditioner.embedders.0 (the prefix is a parameter)."""
    shapes = param_shapes(PRESETS["sdxl-refiner"], vae_config=None)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            **{k: v for k, v in SDXL_REFINER_UNET_CONFIG.items() if not k.startswith("_")})
        te = transformers.CLIPTextModelWithProjection(_hf_config({**CLIP_BIGG_CONFIG, "vocab_size": 49408}))
    expected = {**unet_to_sgm(unet, 2), **openclip_to_sgm(te, "conditioner.embedders.0.model.")}
    assert set(shapes) == set(expected)
    assert all(shapes[k] == tuple(v.shape) for k, v in expected.items())
    enc = OpenCLIPTextEncoder(PRESETS["sdxl-refiner"].text_encoders[0], sgm_prefix="x.")
    assert all(p.name.startswith("x.") for p in enc.get_parameters())


def test_mindone_style_checkpoint_loads_without_mismatch(tmp_path, torch_models, ms_models):
    """A .ckpt in MindONE naming (incl. entries the cells do not model) loads with nothing missing."""
    from lora_parity.backends.port import SDXLComponents

    comps = SDXLComponents(ms_models["unet"], (ms_models["te1"], ms_models["te2"]), ms_models["vae"])
    entries = [{"name": p.name, "data": p} for c in comps.cells() for p in c.get_parameters()]
    extra = {"first_stage_model.encoder.conv_in.weight": np.zeros((16, 3, 3, 3), np.float32),
             "first_stage_model.quant_conv.bias": np.zeros((8,), np.float32),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids":
                 np.arange(SEQ, dtype=np.int32)[None]}
    entries += [{"name": k, "data": Tensor(v)} for k, v in extra.items()]
    path = tmp_path / "tiny_mindone.ckpt"
    ms.save_checkpoint(entries, str(path))
    params = ms.load_checkpoint(str(path))
    fresh = SDXLComponents(UNetModel(UNetLayout.from_diffusers_config(TINY_UNET_CONFIG)),
                           tuple(build_text_encoder(te, cfg) for te, cfg in
                                 zip(sdxl_text_encoders(TINY_TE1_CONFIG, TINY_TE2_CONFIG),
                                     (TINY_TE1_CONFIG, TINY_TE2_CONFIG))),
                           VAEDecoder.from_diffusers_config(TINY_VAE_CONFIG))
    assert fresh.load(params, strict=True) == ([], [])
    ref = {p.name: p.asnumpy() for c in comps.cells() for p in c.get_parameters()}
    assert all(np.array_equal(p.asnumpy(), ref[p.name]) for c in fresh.cells() for p in c.get_parameters())
    te1_tok = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table"
    renamed = {("conditioner.embedders.1.model.token_embedding..embedding_table" if k == te1_tok else k): v
               for k, v in params.items()}  # as MindONE's key list spells it
    assert fresh.load(renamed, strict=True) == ([], [])
    with pytest.raises(ValueError, match="unexpected"):
        fresh.load({**params, "model.diffusion_model.bogus.weight": params[entries[0]["name"]]})


# --------------------------------------------------------------------------- numerics vs diffusers

@pytest.mark.parametrize("impl", ["im2col", "native"])
@pytest.mark.parametrize("cin,cout,k,stride", [(8, 16, 3, 1), (16, 16, 3, 2), (16, 8, 1, 1)])
def test_conv2d_matches_torch(impl, cin, cout, k, stride):
    from lora_parity.backends.port.layers import Conv2d

    rng = np.random.default_rng(cin + k + stride)
    x = rng.standard_normal((2, cin, 9, 10)).astype(np.float32)
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    conv = Conv2d(cin, cout, k, stride, impl=impl)
    _load_numpy(conv, {"weight": w, "bias": b})
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                     stride=stride, padding=k // 2).numpy()
    assert rel_err(conv(Tensor(x)).asnumpy(), ref) <= SAME_FRAMEWORK.rel



def test_text_encoders_match_transformers(ms_models, torch_cond, token_ids):
    ids = Tensor(token_ids.astype(np.int32))
    with capture_activations(ms_models["te1"], ms_models["te2"]) as acts:
        h1, p1 = ms_models["te1"](ids)
        h2, p2 = ms_models["te2"](ids)
    errs = {
        "te1 hidden[-2]": rel_err(h1.asnumpy(), torch_cond["te1_hidden"].numpy()),
        "te1 pooled": rel_err(p1.asnumpy(), torch_cond["te1_pooled"].numpy()),
        "te2 hidden[-2]": rel_err(h2.asnumpy(), torch_cond["te2_hidden"].numpy()),
        "te2 pooled@proj": rel_err(p2.asnumpy(), torch_cond["te2_pooled"].numpy()),
    }
    print("\nrelative errors:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    n = TINY_TE1_CONFIG["num_hidden_layers"]
    assert {f"conditioner.embedders.0.transformer.text_model.encoder.layers.{i}" for i in range(n)} <= set(acts)
    assert {f"conditioner.embedders.1.model.transformer.resblocks.{i}" for i in range(n)} <= set(acts)
    assert "conditioner.embedders.1.model.text_projection" in acts
    np.testing.assert_array_equal(
        acts[f"conditioner.embedders.1.model.transformer.resblocks.{n - 2}"], h2.asnumpy())


def test_sdxl_vector_matches_diffusers_add_embeds(torch_models, torch_cond):
    unet = torch_models["unet"]
    with torch.no_grad():
        t_emb = unet.add_time_proj(torch_cond["time_ids"].flatten()).reshape(2, -1)
        ref = torch.cat([torch_cond["te2_pooled"], t_emb], dim=-1).numpy()
    y = sdxl_vector(Tensor(torch_cond["te2_pooled"].numpy()), *SIZES,
                    dim=TINY_UNET_CONFIG["addition_time_embed_dim"])
    assert rel_err(y.asnumpy(), ref) <= SAME_FRAMEWORK.rel


def test_unet_matches_diffusers(torch_models, ms_models, torch_cond, token_ids, latents):
    tunet, munet = torch_models["unet"], ms_models["unet"]
    # block outputs diffusers exposes one-to-one: SGM name -> diffusers module
    nrb = TINY_UNET_CONFIG["layers_per_block"]
    n_levels = len(TINY_UNET_CONFIG["block_out_channels"])
    pairs = {"time_embed": tunet.time_embedding, "label_emb": tunet.add_embedding,
             "middle_block": tunet.mid_block}
    for i, blk in enumerate(tunet.up_blocks):
        pairs[f"output_blocks.{i * (nrb + 1) + nrb}"] = blk
    for i, blk in enumerate(tunet.down_blocks):  # last res sample of a down block
        last = (i + 1) * (nrb + 1) - (1 if i == n_levels - 1 else 0)
        pairs[f"input_blocks.{last}"] = blk
    got_torch: dict[str, np.ndarray] = {}

    def hook(name):
        def fn(_m, _i, out):
            out = out[0] if isinstance(out, tuple) else out
            got_torch[name] = out.detach().numpy().copy()
        return fn

    x = torch.from_numpy(latents)

    def run_torch():
        with torch.no_grad():
            return tunet(x, torch.from_numpy(TIMESTEPS), torch_cond["context"],
                         added_cond_kwargs={"text_embeds": torch_cond["te2_pooled"],
                                            "time_ids": torch_cond["time_ids"]}).sample.numpy()

    torch_s = _best_time(run_torch)
    handles = [m.register_forward_hook(hook(n)) for n, m in pairs.items()]
    ref = run_torch()
    for h in handles:
        h.remove()
    for name in list(got_torch):  # down blocks return (hidden, res_samples): compare the hidden
        if name.startswith("input_blocks") and isinstance(got_torch[name], tuple):
            got_torch[name] = got_torch[name][0]

    context, y = _ms_unet_inputs(ms_models, token_ids)
    assert rel_err(context.asnumpy(), torch_cond["context"].numpy()) <= TOL
    xm, tm = Tensor(latents), Tensor(TIMESTEPS)
    ms_s = _best_time(lambda: munet(xm, tm, context, y).asnumpy())
    with capture_activations(munet) as acts:
        out = munet(xm, tm, context, y).asnumpy()
    errs = {"unet out": rel_err(out, ref)}
    for name, value in got_torch.items():
        errs[name] = rel_err(acts["model.diffusion_model." + name], value)
    print(f"\nUNet forward (batch 2, 4x16x16, warm, best of 3): mindspore {ms_s:.3f}s, "
          f"diffusers {torch_s:.3f}s")
    print("relative errors:", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    n_in = 1 + n_levels * nrb + n_levels - 1
    expected = ({f"input_blocks.{i}" for i in range(n_in)} | {f"output_blocks.{i}" for i in range(n_in)}
                | {"middle_block", "out", "time_embed", "label_emb"})
    assert {"model.diffusion_model." + n for n in expected} == set(acts)


def test_vae_decoder_matches_diffusers(torch_models, ms_models, latents):
    vae = torch_models["vae"]
    sf = TINY_VAE_CONFIG["scaling_factor"]
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(latents) / sf).sample.numpy()
    with capture_activations(ms_models["vae"]) as acts:
        out = ms_models["vae"](Tensor(latents)).asnumpy()
    err = rel_err(out, ref)
    print(f"\nVAE decode relative error {err:.2e}")
    assert err <= TOL
    assert out.shape == (2, 3, 32, 32)
    assert {"first_stage_model.decoder.mid.attn_1", "first_stage_model.decoder.up.0",
            "first_stage_model.decoder.up.1", "first_stage_model.decoder.conv_out"} <= set(acts)


# --------------------------------------------------------------------------- LoRA

def _random_lora(cell, names: list[str], rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {p.name: p.shape for p in cell.get_parameters()}
    out = {}
    for layer in names:
        w = shapes.get(layer + ".weight") or shapes[layer + "_weight"]  # fused attn.in_proj
        out[layer + ".lora_A.weight"] = (rng.standard_normal((rank, w[1])) / math.sqrt(w[1])).astype(np.float32)
        out[layer + ".lora_B.weight"] = (0.5 * rng.standard_normal((w[0], rank)) / math.sqrt(rank)).astype(np.float32)
    return out


def _folded(cell, lora: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """The base weights with ``scale * B @ A`` added, computed in numpy."""
    weights = {p.name: p.asnumpy().copy() for p in cell.get_parameters() if ".lora_" not in p.name}
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            b = lora[layer + ".lora_B.weight"]
            wname = layer + ".weight" if layer + ".weight" in weights else layer + "_weight"
            weights[wname] = (weights[wname].astype(np.float64) + scale * (b.astype(np.float64) @ a)
                              ).astype(np.float32)
    return weights


def _load_numpy(cell, weights: dict[str, np.ndarray]) -> None:
    params = {k: ms.Parameter(Tensor(v), name=k) for k, v in weights.items()}
    not_loaded, unused = ms.load_param_into_net(cell, params, strict_load=True)
    assert not not_loaded and not unused


def test_unet_lora_unmerged_equals_folded_weights(ms_models, tiny_unet_layout, token_ids, latents):
    base = ms_models["unet"]
    targets = [t for t in lora_targets(base) if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", t)]
    assert len(targets) == 4 * 2 * 2 * 4  # 4 projections, 2 attns, depth 2, 4 SpatialTransformers
    lora = _random_lora(base, targets, rank=4, seed=5)
    alpha, scale = 8.0, 2.0

    reference = UNetModel(tiny_unet_layout)
    _load_numpy(reference, _folded(base, lora, scale))
    unet = UNetModel(tiny_unet_layout)
    _load_numpy(unet, {p.name: p.asnumpy() for p in base.get_parameters()})
    extra = {"conditioner.embedders.0.transformer.x.lora_A.weight": np.zeros((1, 1), np.float32)}
    report = inject_lora(unet, {**lora, **extra}, alpha=alpha)
    assert sorted(report.wrapped) == sorted(targets)
    assert report.skipped_keys == list(extra)
    assert set(report.scales.values()) == {scale}
    names = [p.name for p in unet.get_parameters()]
    assert names == [n for n, _ in unet.parameters_and_names()]
    assert set(lora) <= set(names)
    state = lora_state(unet)
    assert set(state) == set(lora) and all(np.array_equal(state[k], lora[k]) for k in lora)

    context, y = _ms_unet_inputs(ms_models, token_ids)
    xm, tm = Tensor(latents), Tensor(TIMESTEPS)
    ref = reference(xm, tm, context, y).asnumpy()
    unmerged = unet(xm, tm, context, y).asnumpy()
    assert merge_lora(unet) == len(targets)
    merged = unet(xm, tm, context, y).asnumpy()
    plain = base(xm, tm, context, y).asnumpy()
    errs = {"unmerged vs folded": rel_err(unmerged, ref), "merged vs folded": rel_err(merged, ref)}
    print("\nLoRA relative errors:", {k: f"{v:.2e}" for k, v in errs.items()},
          f"(LoRA changes the output by {rel_err(plain, ref):.2e})")
    assert max(errs.values()) <= TOL
    assert rel_err(plain, ref) > 1e-2  # the LoRA does something
    w = {p.name: p.asnumpy() for p in unet.get_parameters()}
    folded = _folded(base, lora, scale)
    assert max(rel_err(w[t + ".weight"], folded[t + ".weight"]) for t in targets) <= SAME_FRAMEWORK.rel
    assert unmerge_lora(unet) == len(targets)
    assert rel_err(unet(xm, tm, context, y).asnumpy(), unmerged) <= TOL


def test_text_encoder_lora_including_fused_in_proj(ms_models, te_layouts, token_ids):
    ids = Tensor(token_ids.astype(np.int32))
    for idx, cls in ((0, HFCLIPTextEncoder), (1, OpenCLIPTextEncoder)):
        base = ms_models[f"te{idx + 1}"]
        wanted = r"(self_attn\.(q|k|v|out)_proj|attn\.in_proj|attn\.out_proj|mlp\.c_fc)$"
        targets = [t for t in lora_targets(base) if re.search(wanted, t)]
        if idx == 1:
            assert any(t.endswith("attn.in_proj") for t in targets)
        lora = _random_lora(base, targets, rank=3, seed=9 + idx)
        reference = cls(te_layouts[idx], base.hidden_act)
        _load_numpy(reference, _folded(base, lora, 1.0))
        te = cls(te_layouts[idx], base.hidden_act)
        _load_numpy(te, {p.name: p.asnumpy() for p in base.get_parameters()})
        inject_lora(te, lora)  # alpha None: scale 1, as MindONE
        ref_h, ref_p = reference(ids)
        h, p = te(ids)
        merge_lora(te)
        hm, pm = te(ids)
        errs = [rel_err(h.asnumpy(), ref_h.asnumpy()), rel_err(p.asnumpy(), ref_p.asnumpy()),
                rel_err(hm.asnumpy(), ref_h.asnumpy()), rel_err(pm.asnumpy(), ref_p.asnumpy())]
        assert max(errs) <= TOL, (idx, errs)


def test_inject_lora_rejects_unknown_layers_and_bad_shapes(tiny_unet_layout):
    unet = UNetModel(tiny_unet_layout)
    layer = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q"
    good = {layer + ".lora_A.weight": np.zeros((2, 64), np.float32),
            layer + ".lora_B.weight": np.zeros((64, 2), np.float32)}
    with pytest.raises(LoraParityError, match="no such layer"):
        inject_lora(unet, {k.replace("attn1", "attn3"): v for k, v in good.items()})
    with pytest.raises(LoraParityError, match="shapes"):
        inject_lora(unet, {**good, layer + ".lora_B.weight": np.zeros((32, 2), np.float32)})
    with pytest.raises(LoraParityError, match="both"):
        inject_lora(unet, {layer + ".lora_A.weight": good[layer + ".lora_A.weight"]})
    assert inject_lora(unet, good).wrapped == [layer]
