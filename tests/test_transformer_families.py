"""SD3 and Flux LoRAs through the converter (issue 15, part): the transformer / T5 key maps generated from
their layouts against the real module trees (meta device), bitwise PEFT <-> kohya round trips on the tiny and
real-size layouts, the family from ``model_index.json`` and from key names, planted naming faults, and files
that diffusers' own ``load_lora_weights`` takes completely.

Names per format (facts: diffusers ``lora_conversion_utils`` / ``lora_pipeline``, ComfyUI ``lora.py``):
PEFT ``transformer.<path>.lora_A.weight`` (text encoders ``text_encoder.`` / ``_2.`` / ``_3.``), kohya
``lora_transformer_<path with . -> _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, CLIP ``lora_te1_`` /
``lora_te2_``, T5 ``lora_te3_`` (SD3) or ``lora_te2_`` (Flux).  mindone.diffusers keeps diffusers' names, so
there is no MindONE ``.ckpt`` to write for these families.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lora_parity.convert import formats, keymap as keymap_mod
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.convert.detect import family_from_keys
from lora_parity.convert.keymap import keymap_for
from lora_parity.convert.layout import (FLUX_DEV_TRANSFORMER_CONFIG, PRESETS, SD3_MEDIUM_TRANSFORMER_CONFIG,
                                        T5_XXL_CONFIG, ModelLayout, family_of, layout_from_pipeline_dir,
                                        load_layout, transformer_layout)
from lora_parity.convert.lora_set import LoraPair, LoraSet
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.convert.tensor import Tensor
from lora_parity.convert import tiny
from lora_parity.errors import LoraParityError

from .helpers import run_cli

pytestmark = pytest.mark.conversion

LAYOUTS = ("tiny-sd3", "tiny-flux", "sd3", "flux")
TRANSFORMER_CONFIGS = {"tiny-sd3": tiny.TINY_SD3_TRANSFORMER_CONFIG, "tiny-flux": tiny.TINY_FLUX_TRANSFORMER_CONFIG,
                       "sd3": SD3_MEDIUM_TRANSFORMER_CONFIG, "flux": FLUX_DEV_TRANSFORMER_CONFIG}
T5_CONFIGS = {"tiny-sd3": tiny.TINY_T5_CONFIG, "tiny-flux": tiny.TINY_T5_CONFIG, "sd3": T5_XXL_CONFIG,
              "flux": T5_XXL_CONFIG}
T5_COMPONENT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
# the kohya spelling of every LoRA module, written independently of the key map (ComfyUI's rule)
KOHYA_TE = {"sd3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
            "flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
PEFT_KEY = re.compile(r"^(?P<comp>transformer|text_encoder(?:_[23])?)\.(?P<path>.+)\.lora_(?P<half>[AB])\.weight$")


def _cfg(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _linears(model, prefix: str, kind: str = "Linear") -> dict:
    return {prefix + n: m for n, m in model.named_modules() if type(m).__name__ == kind}


def meta_transformer(config: dict):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if config["_class_name"] == "SD3Transformer2DModel" else FluxTransformer2DModel
    with torch.device("meta"):
        return cls(**_cfg(config))


def meta_t5(config: dict):
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return T5EncoderModel(T5Config(**config))


def _map_problems(entries: dict, modules: dict) -> list[str]:
    """Missing / extra modules, and entries whose (out, in) shape or bias differ from the real Linear."""
    out = [f"no map entry: {n}" for n in sorted(set(modules) - set(entries))]
    out += [f"not in the model: {n}" for n in sorted(set(entries) - set(modules))]
    for n in sorted(set(entries) & set(modules)):
        e, m = entries[n], modules[n]
        if tuple(m.weight.shape) != e.weight_shape():
            out.append(f"shape {n}: model {tuple(m.weight.shape)}, map {e.weight_shape()}")
        if (m.bias is not None) != e.bias:
            out.append(f"bias {n}")
    return out


# ---------------------------------------------------------------- key maps vs the real module trees

@pytest.mark.parametrize("name", LAYOUTS)
def test_transformer_map_is_every_linear_of_diffusers_transformer(name):
    layout = load_layout(name)
    model = meta_transformer(TRANSFORMER_CONFIGS[name])
    ours = {e.diffusers[0]: e for e in keymap_for(layout).lora_entries("transformer")}
    assert not _map_problems(ours, _linears(model, "transformer."))
    convs = set(_linears(model, "transformer.", "Conv2d"))
    assert convs == ({"transformer.pos_embed.proj"} if layout.family == "sd3" else set())  # left out: patchify
    if layout.family == "sd3":  # the last joint block is context_pre_only: no text-side output
        last = f"transformer.transformer_blocks.{layout.transformer.num_layers - 1}."
        assert f"{last}attn.add_q_proj" in ours and f"{last}attn.to_add_out" not in ours
        assert not any(n.startswith(f"{last}ff_context.") for n in ours)


def test_sd35_dual_attention_blocks_are_mapped():
    cfg = {**tiny.TINY_SD3_TRANSFORMER_CONFIG, "dual_attention_layers": [0]}
    layout = transformer_layout("tiny-sd35", cfg, (), None)
    ours = {e.diffusers[0]: e for e in keymap_for(layout).lora_entries("transformer")}
    assert not _map_problems(ours, _linears(meta_transformer(cfg), "transformer."))
    assert "transformer.transformer_blocks.0.attn2.to_q" in ours
    assert "transformer.transformer_blocks.1.attn2.to_q" not in ours


@pytest.mark.parametrize("name", LAYOUTS)
def test_t5_and_clip_maps_are_every_linear_of_transformers_encoders(name):
    layout = load_layout(name)
    km = keymap_for(layout)
    t5 = T5_COMPONENT[layout.family]
    ours = {e.diffusers[0]: e for e in km.lora_entries(t5)}
    assert not _map_problems(ours, _linears(meta_t5(T5_CONFIGS[name]), f"{t5}."))
    assert {"wi_0", "wi_1", "wo"} <= {n.rsplit(".", 1)[1] for n in ours}  # v1.1: gated-gelu
    if name.startswith("tiny"):  # the real-size CLIPs are checked by test_keymap.py (same tables)
        from .helpers import meta_text_encoder

        clips = ((tiny.TINY_SD3_CLIP_CONFIG, tiny.TINY_SD3_CLIP_G_CONFIG) if layout.family == "sd3"
                 else (tiny.TINY_TE1_CONFIG,))
        for i, cfg in enumerate(clips):
            comp = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
            model = meta_text_encoder(cfg, projection=True)  # keeps "text_model." under transformers 5
            mods = {n: m for n, m in _linears(model, f"{comp}.").items() if not n.endswith("text_projection")}
            assert not _map_problems({e.diffusers[0]: e for e in km.lora_entries(comp)}, mods)


@pytest.mark.parametrize("name", LAYOUTS)
def test_kohya_names_are_unique_and_follow_comfyui_rule(name):
    layout = load_layout(name)
    km = keymap_for(layout)
    parts = [(e, i) for e in km.lora_entries() for i in range(len(e.diffusers))]
    names = [keymap_mod.kohya_name(e, i, te_prefixes=km.te_kohya) for e, i in parts]
    assert len(set(names)) == len(names)
    assert names == [_kohya_rule(layout.family, e.diffusers[i]) for e, i in parts]
    assert all(km.by_kohya[n] == p for n, p in zip(names, parts))


def _kohya_rule(family: str, peft_module: str) -> str:
    comp, path = peft_module.split(".", 1)
    prefix = "lora_transformer_" if comp == "transformer" else KOHYA_TE[family][comp]
    return prefix + path.replace(".", "_")


# ---------------------------------------------------------------- LoRAs, written as diffusers / mindone save them

def make_pt_lora(layout: ModelLayout, names, *, rank: int, alphas, dtype: str, seed: int) -> LoraSet:
    """A PEFT-side LoRA on ``names`` (diffusers module names), alpha per module; random, exact in ``dtype``."""
    km = keymap_for(layout)
    rng = np.random.default_rng(seed)
    pairs = {}
    for j, n in enumerate(names):
        e, _ = km.by_diffusers[n]
        sa, sb = e.lora_shapes(rank)
        a = Tensor.from_numpy(rng.standard_normal(sa).astype(np.float32), dtype)
        b = Tensor.from_numpy(rng.standard_normal(sb).astype(np.float32), dtype)
        pairs[e.sgm] = LoraPair(e, a, b, float(alphas[j % len(alphas)]))
    return LoraSet(pairs, layout, f"layout '{layout.name}' (generated)", "peft")


def write_peft(path: Path, lora: LoraSet) -> Path:
    write_safetensors(path, *formats.tensors_for(lora, "peft"))
    return path


def _assert_same_file(a: Path, b: Path):
    ta, ma = read_safetensors(a)
    tb, mb = read_safetensors(b)
    assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:5]
    bad = [k for k in ta if not ta[k].bitwise_equal(tb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    for key in (formats.ADAPTER_METADATA_KEY, "ss_network_dim", "ss_network_alpha"):
        assert ma.get(key) == mb.get(key), key


def kohya_vs_peft(peft: dict, kohya: dict, family: str) -> list[str]:
    """Problems of a kohya file against its PEFT source, by ComfyUI's naming rule, not by our key map."""
    problems = []
    for k, t in peft.items():
        m = PEFT_KEY.match(k)
        if m is None:
            continue
        name = _kohya_rule(family, formats.peft_module(m.group("comp"), m.group("path")))
        got = kohya.get(f"{name}.lora_{'down' if m.group('half') == 'A' else 'up'}.weight")
        if got is None or not got.bitwise_equal(t):
            problems.append(f"{k} -> {name}")
    return problems


@st.composite
def transformer_cases(draw):
    name = draw(st.sampled_from(LAYOUTS))
    km = keymap_for(load_layout(name))
    mods = [d for e in km.lora_entries() for d in e.diffusers]
    subset = draw(st.lists(st.sampled_from(mods), min_size=1, max_size=24, unique=True))
    rank = draw(st.integers(1, 4))
    alphas = draw(st.lists(st.sampled_from([1.0, 0.5, 3.0, 8.0, float(rank)]), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(["F32", "F16", "BF16"]))
    return name, subset, rank, alphas, dtype, draw(st.integers(0, 2 ** 16))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(transformer_cases())
def test_peft_kohya_peft_is_bitwise(tmp_path_factory, case):
    name, subset, rank, alphas, dtype, seed = case
    d = tmp_path_factory.mktemp("rt")
    layout = load_layout(name)
    src = write_peft(d / "src.safetensors", make_pt_lora(layout, subset, rank=rank, alphas=alphas, dtype=dtype,
                                                         seed=seed))
    convert(ConvertOptions(src=src, dst=d / "k.safetensors", fmt="kohya", layout=name))
    peft, _ = read_safetensors(src)
    kohya, _ = read_safetensors(d / "k.safetensors")
    assert not kohya_vs_peft(peft, kohya, layout.family)
    convert(ConvertOptions(src=d / "k.safetensors", dst=d / "back.safetensors", fmt="peft", layout=name))
    _assert_same_file(src, d / "back.safetensors")
    convert(ConvertOptions(src=d / "back.safetensors", dst=d / "k2.safetensors", fmt="kohya", layout=name))
    _assert_same_file(d / "k.safetensors", d / "k2.safetensors")  # kohya -> PEFT -> kohya too


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cli_round_trip_real_size_detects_family_and_defaults_to_the_other_format(tmp_path, name):
    layout = PRESETS[name]
    km = keymap_for(layout)
    names = [e.diffusers[0] for e in km.lora_entries()][::7]  # every block kind, all components
    src = write_peft(tmp_path / "lora.safetensors", make_pt_lora(layout, names, rank=2, alphas=[4.0, 1.0],
                                                                  dtype="BF16", seed=3))
    code, out, err = run_cli(["convert", str(src)])  # no --layout, no --format: detected, PEFT -> kohya
    assert code == 0, err
    assert f"layout '{name}' (detected" in out
    kohya = tmp_path / "lora_kohya.safetensors"
    code, out, err = run_cli(["convert", str(kohya), "-o", str(tmp_path / "back.safetensors")])
    assert code == 0, err
    _assert_same_file(src, tmp_path / "back.safetensors")
    # Flux T5 read under ComfyUI's other spelling (lora_te3_) as well
    if name == "flux":
        t, meta = read_safetensors(kohya)
        write_safetensors(tmp_path / "te3.safetensors", {k.replace("lora_te2_", "lora_te3_"): v for k, v in t.items()},
                          meta)
        code, _, err = run_cli(["convert", str(tmp_path / "te3.safetensors"), "-o", str(tmp_path / "b3.safetensors")])
        assert code == 0, err
        _assert_same_file(src, tmp_path / "b3.safetensors")


@pytest.mark.parametrize("fmt,out", [("ms", "x.ckpt"), ("kohya", "x.ckpt"), ("peft", "x.ckpt")])
def test_mindone_ckpt_is_refused_in_one_line(tmp_path, fmt, out):
    layout = load_layout("tiny-flux")
    src = write_peft(tmp_path / "l.safetensors", make_pt_lora(layout, ["transformer.proj_out"], rank=2,
                                                               alphas=[2.0], dtype="F32", seed=0))
    code, _, err = run_cli(["convert", str(src), "--layout", "tiny-flux", "--format", fmt, "-o", str(tmp_path / out)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no .ckpt LoRA format for FLUX" in err and "mindone.diffusers" in err
    assert not (tmp_path / out).exists()


# ---------------------------------------------------------------- family detection

def _pipeline_dir(root: Path, family: str, *, pipeline: str | None = None, transformer_cls: str | None = None) -> Path:
    root.mkdir()
    tcfg = dict(tiny.TINY_SD3_TRANSFORMER_CONFIG if family == "sd3" else tiny.TINY_FLUX_TRANSFORMER_CONFIG)
    if transformer_cls:
        tcfg["_class_name"] = transformer_cls
    clips = ((tiny.TINY_SD3_CLIP_CONFIG, tiny.TINY_SD3_CLIP_G_CONFIG) if family == "sd3" else (tiny.TINY_TE1_CONFIG,))
    files = {"model_index.json": {"_class_name": pipeline or
                                  ("StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline")},
             "transformer/config.json": tcfg, f"{T5_COMPONENT[family]}/config.json": tiny.TINY_T5_CONFIG}
    for i, c in enumerate(clips):
        files[f"text_encoder{'' if i == 0 else f'_{i + 1}'}/config.json"] = c
    for rel, obj in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj))
    return root


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_family_and_layout_from_pipeline_folder(tmp_path, family):
    layout = layout_from_pipeline_dir(_pipeline_dir(tmp_path / "p", family))
    assert layout.family == family
    tiny_layout = load_layout(f"tiny-{family}")
    assert layout.transformer == dataclasses.replace(tiny_layout.transformer, name="p")
    assert layout.text_encoders == tiny_layout.text_encoders
    assert load_layout(str(tmp_path / "p" / "transformer" / "config.json")).family == family
    assert family_of(json.loads((tmp_path / "p" / "transformer" / "config.json").read_text())) == family


@pytest.mark.parametrize("pipeline,cls,says", [
    ("FluxPipeline", None, "model_index.json's pipeline 'FluxPipeline' does not go with a SD3Transformer2DModel"),
    (None, "HunyuanDiT2DModel", "transformer/config.json has _class_name 'HunyuanDiT2DModel'"),
])
def test_wrong_pipeline_folder_is_one_line_naming_the_file(tmp_path, pipeline, cls, says):
    root = _pipeline_dir(tmp_path / "p", "sd3", pipeline=pipeline, transformer_cls=cls)
    with pytest.raises(LoraParityError) as exc:
        layout_from_pipeline_dir(root)
    msg = str(exc.value)
    assert says in msg and "transformer/config.json" in msg and "\n" not in msg


def test_unet_only_steps_on_a_transformer_layout_raise_a_clear_error():
    layout = PRESETS["sd3"]
    assert not layout.unet and layout.is_transformer
    with pytest.raises(LoraParityError, match=r"layout 'sd3' \(SD3\) has a diffusers transformer, no UNet"):
        layout.unet.addition_time_embed_dim
    assert hash(layout) == hash(load_layout("sd3"))  # still a cache key
    from lora_parity.convert.fullweights import param_maps

    with pytest.raises(LoraParityError, match="UNet families only"):
        param_maps(layout)
    with pytest.raises(LoraParityError, match="needs a UNet layout"):
        ModelLayout("x", None, family="sdxl")


@pytest.mark.parametrize("name", LAYOUTS)
def test_family_from_key_names(name):
    layout = load_layout(name)
    km = keymap_for(layout)
    lora = make_pt_lora(layout, [d for e in km.lora_entries() for d in e.diffusers], rank=1, alphas=[1.0],
                        dtype="F32", seed=0)
    for fmt in ("peft", "kohya"):
        keys = list(formats.tensors_for(lora, fmt)[0])
        assert family_from_keys(keys) == layout.family, fmt
    joint_only = [k for k in formats.tensors_for(lora, "peft")[0] if ".transformer_blocks." in k]
    assert family_from_keys(joint_only) == "transformer"  # joint blocks alone: either family
    sdxl = list(formats.tensors_for(make_pt_lora(PRESETS["sdxl-base"], ["unet.conv_in"], rank=1, alphas=[1.0],
                                                 dtype="F32", seed=0), "kohya")[0])
    assert family_from_keys(sdxl) is None
    assert family_from_keys(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "flux"


def test_tiny_transformer_lora_without_layout_names_the_family(tmp_path):
    src = write_peft(tmp_path / "l.safetensors", make_pt_lora(load_layout("tiny-flux"),
                                                               ["transformer.single_transformer_blocks.0.proj_mlp"],
                                                               rank=2, alphas=[2.0], dtype="F32", seed=0))
    code, _, err = run_cli(["convert", str(src)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a Flux LoRA by its key names that fits no built-in size" in err and "tiny-flux" in err


# ---------------------------------------------------------------- planted faults

@pytest.mark.parametrize("fault", ["qk_swap", "wrong_block", "collision"])
def test_planted_kohya_naming_fault_is_caught(tmp_path, monkeypatch, fault):
    """A writer that names to_q as to_k (and back) in one joint block, or puts a single block's proj_mlp under
    the next block: the independent naming rule and the round trip both see it; where two modules would share
    one name the writer refuses instead of dropping one."""
    name = "tiny-flux"
    layout = load_layout(name)
    km = keymap_for(layout)
    moved = "transformer.single_transformer_blocks.1.proj_mlp"
    names = [d for e in km.lora_entries("transformer") for d in e.diffusers
             if fault == "collision" or d != moved]
    src = write_peft(tmp_path / "src.safetensors", make_pt_lora(layout, names, rank=2, alphas=[2.0],
                                                                 dtype="F32", seed=1))
    real = keymap_mod.kohya_name

    def faulty(entry, part=0, **kw):
        out = real(entry, part, **kw)
        if fault == "qk_swap" and out.startswith("lora_transformer_transformer_blocks_0_attn_to_"):
            return out.replace("_to_q", "_TMP").replace("_to_k", "_to_q").replace("_TMP", "_to_k")
        if fault != "qk_swap" and out == "lora_transformer_single_transformer_blocks_0_proj_mlp":
            return "lora_transformer_single_transformer_blocks_1_proj_mlp"
        return out

    monkeypatch.setattr(formats, "kohya_name", faulty)
    if fault == "collision":
        with pytest.raises(LoraParityError, match="single_transformer_blocks_1_proj_mlp"):
            convert(ConvertOptions(src=src, dst=tmp_path / "k.safetensors", fmt="kohya", layout=name))
        assert not (tmp_path / "k.safetensors").exists()
        return
    convert(ConvertOptions(src=src, dst=tmp_path / "k.safetensors", fmt="kohya", layout=name))
    monkeypatch.setattr(formats, "kohya_name", real)
    peft, _ = read_safetensors(src)
    kohya, _ = read_safetensors(tmp_path / "k.safetensors")
    problems = kohya_vs_peft(peft, kohya, layout.family)
    where = "transformer_blocks.0.attn.to_" if fault == "qk_swap" else "single_transformer_blocks.0.proj_mlp"
    assert problems and all(where in p for p in problems), problems
    convert(ConvertOptions(src=tmp_path / "k.safetensors", dst=tmp_path / "back.safetensors", fmt="peft", layout=name))
    with pytest.raises(AssertionError):
        _assert_same_file(src, tmp_path / "back.safetensors")


# ---------------------------------------------------------------- diffusers' own loader

def tiny_pipeline(family: str):
    """A random-weight tiny SD3 / Flux diffusers pipeline (no tokenizers: loading a LoRA needs none)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(**tiny.TINY_T5_CONFIG))
    if family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**_cfg(tiny.TINY_SD3_TRANSFORMER_CONFIG)),
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=AutoencoderKL(**_cfg(tiny.TINY_SD3_VAE_CONFIG)),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**tiny.TINY_SD3_CLIP_CONFIG)), tokenizer=None,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**tiny.TINY_SD3_CLIP_G_CONFIG)),
            tokenizer_2=None, text_encoder_3=t5, tokenizer_3=None)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**_cfg(tiny.TINY_FLUX_TRANSFORMER_CONFIG)),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=AutoencoderKL(**_cfg(tiny.TINY_FLUX_VAE_CONFIG)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**tiny.TINY_TE1_CONFIG)), tokenizer=None, text_encoder_2=t5,
        tokenizer_2=None)


#: what each pipeline's load_lora_weights loads (diffusers ``_lora_loadable_modules``): no T5 LoRA in either
LOADABLE = {"sd3": ("transformer", "text_encoder", "text_encoder_2"), "flux": ("transformer", "text_encoder")}


def landed(pipe, family: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """PEFT module name -> (lora_A, lora_B, scaling) of every LoRA layer diffusers injected."""
    out = {}
    for comp in LOADABLE[family]:
        for n, m in getattr(pipe, comp).named_modules():
            if getattr(m, "lora_A", None) is not None and len(m.lora_A):
                (ad,) = list(m.lora_A.keys())
                out[formats.peft_module(comp, n)] = (m.lora_A[ad].weight.detach().float().numpy(),
                                                     m.lora_B[ad].weight.detach().float().numpy(), m.scaling[ad])
    return out


def _loadable_modules(layout: ModelLayout, *, kohya: bool = False) -> list[str]:
    """Every LoRA module on the components diffusers loads; ``kohya``: only what diffusers' Flux kohya reader
    maps (``_convert_mixture_state_dict_to_diffusers``: block attention projections, the top-level linears,
    CLIP attention and MLP; a block's feed-forward or norm would land under the block's own name)."""
    return [e.diffusers[0] for e in keymap_for(layout).lora_entries()
            if e.component in LOADABLE[layout.family]
            and not (kohya and e.component == "transformer" and "blocks." in e.sgm and ".attn." not in e.sgm)]


def _check_landed(got: dict, lora: LoraSet, *, a_factor: float, scaling: float) -> None:
    expect = {p.module.diffusers[0]: (p.A.to_float("float32"), p.B.to_float("float32")) for p in lora.ordered()}
    assert set(got) == set(expect), sorted(set(got) ^ set(expect))[:5]
    bad = [k for k, (a, b, s) in got.items()
           if not (np.array_equal(a, expect[k][0] * np.float32(a_factor)) and np.array_equal(b, expect[k][1])
                   and s == scaling)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_loads_every_tensor_of_our_peft_and_kohya_files(tmp_path, family):
    name = f"tiny-{family}"
    layout = load_layout(name)
    rank, alpha = 2, 4.0  # alpha/rank = 2: diffusers' kohya reader folds it into lora_A, exactly
    lora = make_pt_lora(layout, _loadable_modules(layout), rank=rank, alphas=[alpha], dtype="F32", seed=7)
    src = write_peft(tmp_path / "peft.safetensors", lora)
    pipe = tiny_pipeline(family)
    pipe.load_lora_weights(str(src))
    _check_landed(landed(pipe, family), lora, a_factor=1.0, scaling=alpha / rank)

    klora = make_pt_lora(layout, _loadable_modules(layout, kohya=True), rank=rank, alphas=[alpha], dtype="F32",
                         seed=8)
    ksrc = write_peft(tmp_path / "k_src.safetensors", klora)
    convert(ConvertOptions(src=ksrc, dst=tmp_path / "kohya.safetensors", fmt="kohya", layout=name))
    pipe = tiny_pipeline(family)
    if family == "sd3":  # diffusers reads no kohya SD3 file (ComfyUI does): nothing lands
        try:
            pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"))
        except (ValueError, KeyError):
            pass
        assert not landed(pipe, family)
        return
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    # kohya: alpha/rank folded into lora_A by diffusers' reader, PEFT scaling 1
    _check_landed(landed(pipe, family), klora, a_factor=alpha / rank, scaling=1.0)


# ---------------------------------------------------------------- sd-scripts' Flux LoRA (BFL names), read only

def test_sd_scripts_flux_bfl_names_read_exactly(tmp_path):
    """A LoRA on BFL's fused Linears is the diffusers modules' LoRAs with one shared lora_down and lora_up
    stacked by rows (final modulation: BFL (shift, scale) vs diffusers (scale, shift)); read back bitwise."""
    layout = load_layout("tiny-flux")
    h = layout.transformer.hidden_size
    rng = np.random.default_rng(11)
    rank, alpha = 2, 3.0

    def t(*shape):
        return Tensor.from_numpy(rng.standard_normal(shape).astype(np.float32))

    groups = {  # BFL module -> diffusers modules (lora_up row order), from BFL's and diffusers' module code
        "double_blocks_0_img_attn_qkv": [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"],
        "double_blocks_0_txt_attn_qkv": [f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"],
        "double_blocks_0_img_mod_lin": ["transformer_blocks.0.norm1.linear"],
        "single_blocks_1_linear1": [f"single_transformer_blocks.1.attn.to_{p}" for p in "qkv"]
                                   + ["single_transformer_blocks.1.proj_mlp"],
        "single_blocks_1_linear2": ["single_transformer_blocks.1.proj_out"],
        "img_in": ["x_embedder"],
        "guidance_in_out_layer": ["time_text_embed.guidance_embedder.linear_2"],
        "final_layer_adaLN_modulation_1": ["norm_out.linear"],
    }
    km = keymap_for(layout)
    bfl_file, expect = {}, {}
    for bfl, mods in groups.items():
        entries = [km.by_diffusers[f"transformer.{m}"][0] for m in mods]
        a = t(rank, entries[0].in_features)
        ups = [t(e.out_features, rank) for e in entries]
        for e, b in zip(entries, ups):
            expect[e.diffusers[0]] = (a, b)
        up = np.concatenate([b.data for b in ups], axis=0)
        if bfl.startswith("final_layer"):
            up = np.concatenate([up[h:], up[:h]], axis=0)  # BFL order: shift first
        bfl_file[f"lora_unet_{bfl}.lora_down.weight"] = a
        bfl_file[f"lora_unet_{bfl}.lora_up.weight"] = Tensor.from_numpy(up)
        bfl_file[f"lora_unet_{bfl}.alpha"] = Tensor.from_numpy(np.array(alpha, dtype=np.float32).reshape(()))
    write_safetensors(tmp_path / "bfl.safetensors", bfl_file, {"ss_network_module": "networks.lora_flux"})
    code, out, err = run_cli(["convert", str(tmp_path / "bfl.safetensors"), "--layout", "tiny-flux",
                              "--format", "peft", "-o", str(tmp_path / "peft.safetensors")])
    assert code == 0, err
    assert "sd-scripts' Flux (BFL) names" in out
    lora = load_lora(tmp_path / "peft.safetensors", layout=layout)
    got = {p.module.diffusers[0]: p for p in lora.ordered()}
    assert set(got) == set(expect)
    bad = [n for n, (a, b) in expect.items()
           if not (got[n].A.bitwise_equal(a) and got[n].B.bitwise_equal(b) and got[n].alpha == alpha)]
    assert not bad, bad
    # a fused lora_up whose rows do not fit the modules is one line naming the key
    bad_file = dict(bfl_file)
    bad_file["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = t(3 * h + 1, rank)
    write_safetensors(tmp_path / "bad.safetensors", bad_file)
    code, _, err = run_cli(["convert", str(tmp_path / "bad.safetensors"), "--layout", "tiny-flux", "--format", "peft",
                            "-o", str(tmp_path / "x.safetensors")])
    assert code == 2 and "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in err
    assert len(err.strip().splitlines()) == 1
