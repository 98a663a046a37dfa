"""``--base SPEC`` resolution (lora_parity.bases): random models, diffusers folders, SGM single files.

Tiny models are generated for real; full-size SDXL is checked on the meta device only
(names and shapes, nothing allocated).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lora_parity.bases import DiffusersFolderWeights, default_cache_dir, resolve_base
from lora_parity.bases.configs import (CLIP_VOCAB_SIZE, PIPELINES, SDXL_TE1_CONFIG, SDXL_TE2_CONFIG,
                                       SDXL_VAE_CONFIG, clip_vocab, meta_state_shapes, write_tokenizer)
from lora_parity.bases.random_weights import (ACTIVATION_RMS_RANGE, BIAS_STD, EMBEDDING_STD, MARKER,
                                              RESIDUAL_GAIN, init_spec, random_tensor)
from lora_parity.bases.single_file import SingleFileWeights, expected_params, torch_spelling, write_single_file
from lora_parity.errors import LoraParityError
from lora_parity.fixtures.tiny_pipeline import EOS_TOKEN
from lora_parity.convert.fullweights import VaeLayout, normalize_diffusers_names, param_maps
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.convert.tiny import TINY_IMAGE_SIZE

# conversion: names, files, bytes; parity: tests that run a forward pass (the init rule's health)

TINY = ("tiny", "tiny-refiner")
PIPELINE_CLASS = {"tiny": "StableDiffusionXLPipeline", "tiny-refiner": "StableDiffusionXLImg2ImgPipeline"}
LOAD_PROBLEMS = re.compile(r"missing|unexpected|not initiali[sz]ed|newly initiali[sz]ed|not used", re.I)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bases_cache")


@pytest.fixture(scope="module", params=TINY)
def tiny_base(request, cache):
    return resolve_base(f"random:{request.param}", cache=cache)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].bitwise_equal(b[k]) for k in a)


# ----------------------------------------------------------------------------------------- random:


@pytest.mark.conversion
def test_random_tiny_is_complete_deterministic_and_reused(tiny_base, cache, tmp_path, monkeypatch):
    b = tiny_base
    name = b.layout_name
    assert (b.kind, b.variant, b.default_image_size) == ("random", "fp16", TINY_IMAGE_SIZE)
    assert b.is_refiner == (name == "tiny-refiner") and b.single_file is None
    files = _files(b.pipeline_dir)
    assert MARKER in files and json.loads(files[MARKER])["seed"] == 0
    weights = [f for f in files if f.endswith(".safetensors")]
    assert weights and all(f.endswith(".fp16.safetensors") for f in weights)
    assert ("text_encoder/model.fp16.safetensors" in files) == (not b.is_refiner)
    # same bytes from another cache, drawn on one thread or on five; a different seed changes the weights
    for threads, folder in (("1", "c2"), ("5", "c3")):
        monkeypatch.setenv("LORA_PARITY_THREADS", threads)
        other = resolve_base(f"random:{name}:0", cache=tmp_path / folder)
        assert _files(other.pipeline_dir) == files, threads
    seeded = resolve_base(f"random:{name}:1", cache=tmp_path / "c2")
    assert seeded.pipeline_dir != other.pipeline_dir
    assert _files(seeded.pipeline_dir)[weights[0]] != files[weights[0]]
    # reused: nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in b.pipeline_dir.rglob("*")}
    again = resolve_base(f"random:{name}", cache=cache)
    assert again == b
    assert {p: p.stat().st_mtime_ns for p in b.pipeline_dir.rglob("*")} == mtimes
    assert not list(b.pipeline_dir.parent.glob("*.tmp-*"))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parity
def test_random_tiny_loads_in_diffusers_with_every_weight(tiny_base):
    import diffusers
    import torch

    b = tiny_base
    index = json.loads((b.pipeline_dir / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASS[b.layout_name]
    cls = getattr(diffusers, index["_class_name"])
    rec = _Records()  # both libraries' root loggers do not propagate: listen on them directly
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    for lg in loggers:
        lg.addHandler(rec)
    try:
        pipe = cls.from_pretrained(b.pipeline_dir, variant=b.variant)
    finally:
        for lg in loggers:
            lg.removeHandler(rec)
    assert not [m for m in rec.messages if LOAD_PROBLEMS.search(m)]
    if b.is_refiner:
        assert pipe.text_encoder is None and pipe.tokenizer is None
        assert pipe.config.requires_aesthetics_score and not pipe.config.force_zeros_for_empty_prompt
    # every loaded tensor equals the file: nothing was left randomly initialised
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        model = getattr(pipe, comp)
        if model is None:
            continue
        (path,) = (b.pipeline_dir / comp).glob("*.fp16.safetensors")
        saved, _ = read_safetensors(path)
        # the files use the Hub's names (CLIP-L with "text_model."), which transformers 5 maps onto its
        # flattened CLIPTextModel
        state = {(f"text_model.{k}" if comp == "text_encoder" and not k.startswith("text_model.") else k): v
                 for k, v in model.state_dict().items()}
        assert set(state) == set(saved), comp
        for k, t in saved.items():
            assert torch.equal(state[k].detach().to(torch.float32), torch.from_numpy(t.to_float("float32"))), k


@pytest.mark.conversion
def test_tokenizers_emit_ids_the_text_encoders_accept(tiny_base, tmp_path):
    from transformers import CLIPTokenizer

    b = tiny_base
    toks = [("tokenizer_2", "text_encoder_2")] + ([] if b.is_refiner else [("tokenizer", "text_encoder")])
    for tok_dir, te_dir in toks:
        cfg = json.loads((b.pipeline_dir / te_dir / "config.json").read_text())
        for tok in _fast_and_slow(b.pipeline_dir / tok_dir, tmp_path / tok_dir):
            ids = tok("a photo of a red cube, ünïcode!").input_ids
            assert max(ids) < cfg["vocab_size"]
            assert (ids[0], ids[-1]) == (cfg["bos_token_id"], cfg["eos_token_id"])
            assert CLIPTokenizer is type(tok)


def _fast_and_slow(folder: Path, slow_dir: Path):
    """The folder as saved (tokenizer.json) and only its slow files (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    slow_dir.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / f, slow_dir / f)
    return CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(slow_dir)


@pytest.mark.conversion
def test_full_size_tokenizer_matches_the_sdxl_text_encoder_configs(tmp_path):
    vocab = clip_vocab()
    assert len(vocab) == CLIP_VOCAB_SIZE == SDXL_TE1_CONFIG["vocab_size"] == SDXL_TE2_CONFIG["vocab_size"]
    write_tokenizer(tmp_path / "tok", vocab, EOS_TOKEN)
    for tok in _fast_and_slow(tmp_path / "tok", tmp_path / "slow"):
        ids = tok("a photo of a cat, ÿ€", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and max(ids) < CLIP_VOCAB_SIZE
        for cfg in (SDXL_TE1_CONFIG, SDXL_TE2_CONFIG):
            assert ids[0] == cfg["bos_token_id"] and cfg["eos_token_id"] in ids


@pytest.mark.conversion
def test_init_rule():
    fan = 320 * 3 * 3
    assert init_spec("unet.down_blocks.0.resnets.0.norm1.weight", (320,)) == (1.0, 0.0)
    assert init_spec("unet.down_blocks.0.resnets.0.norm1.bias", (320,)) == (0.0, 0.0)
    assert init_spec("text_encoder.text_model.final_layer_norm.bias", (768,)) == (0.0, 0.0)
    assert init_spec("unet.down_blocks.0.resnets.0.conv1.weight", (320, 320, 3, 3)).std == 1 / np.sqrt(fan)
    assert init_spec("unet.down_blocks.0.resnets.0.conv1.bias", (320,)).std == BIAS_STD
    residual = ["unet.down_blocks.0.resnets.0.conv2.weight", "unet.mid_block.attentions.0.proj_out.weight",
                "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
                "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight",
                "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj.weight",
                "text_encoder_2.text_model.encoder.layers.0.mlp.fc2.weight",
                "vae.decoder.mid_block.attentions.0.to_out.0.weight", "vae.decoder.up_blocks.0.resnets.0.conv2.weight"]
    for name in residual:
        assert init_spec(name, (320, 320, 3, 3)).std == RESIDUAL_GAIN / np.sqrt(fan), name
    assert init_spec("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight", (64, 64)).std == 1 / 8
    assert init_spec("text_encoder_2.text_projection.weight", (64, 64)).std == 1 / 8
    for name in ("text_encoder.text_model.embeddings.token_embedding.weight",
                 "text_encoder.text_model.embeddings.position_embedding.weight"):
        assert init_spec(name, (49408, 768)) == (0.0, EMBEDDING_STD)


def test_draws_into_reused_buffers_are_the_rule_bitwise():
    """The generator writes into buffers it uses again (a larger one first, so stale values sit beyond the
    tensor): every tensor is still exactly standard_normal(shape) x std (+ mean) rounded to float16, per name."""
    import zlib

    cases = [("unet.down_blocks.0.resnets.0.conv1.weight", (32, 16, 3, 3)), ("unet.conv_in.bias", (32,)),
             ("text_encoder.text_model.embeddings.token_embedding.weight", (97, 8)),
             ("unet.down_blocks.0.resnets.0.norm1.weight", (32,)), ("text_encoder_2.logit_scale", ())]
    big = np.full(32 * 16 * 9, np.float16(7.0))
    for name, shape in cases:
        spec = init_spec(name, shape)
        rng = np.random.default_rng([0, zlib.crc32(name.encode())])
        want = (np.full(shape, spec.mean, np.float32) if spec.std == 0.0 else
                rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.std) + np.float32(spec.mean))
        want = want.astype(np.float16)
        n = int(np.prod(shape))
        for got in (random_tensor(0, name, shape), random_tensor(0, name, shape, out=big[:n].reshape(shape))):
            assert got.shape == tuple(shape) and got.dtype == np.float16
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), name


@pytest.mark.parity
def test_random_tiny_activations_stay_finite_and_nontrivial(tiny_base):
    """Every UNet block of the generated tiny model, in float32, has an RMS within the rule's range."""
    import diffusers
    import torch

    b = tiny_base
    unet = diffusers.UNet2DConditionModel.from_pretrained(b.pipeline_dir / "unet", variant="fp16",
                                                          torch_dtype=torch.float32)
    cfg = unet.config
    pooled = PIPELINES[b.layout_name].te2["projection_dim"]
    rms = {}
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for i, blk in enumerate(blocks):
        blk.register_forward_hook(lambda m, a, out, i=i: rms.__setitem__(
            i, float((out[0] if isinstance(out, tuple) else out).float().pow(2).mean().sqrt())))
    g = torch.Generator().manual_seed(0)
    n_ids = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim
    with torch.no_grad():
        out = unet(torch.randn(1, 4, cfg.sample_size, cfg.sample_size, generator=g), 500,
                   encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim, generator=g),
                   added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g),
                                      "time_ids": torch.full((1, n_ids), 32.0)}).sample
    lo, hi = ACTIVATION_RMS_RANGE
    assert len(rms) == len(blocks) and all(lo < v < hi for v in rms.values()), rms
    assert torch.isfinite(out).all() and lo < float(out.pow(2).mean().sqrt()) < hi


# ----------------------------------------------------------------------------------------- diffusers folders


@pytest.mark.conversion
def test_folder_weights_cover_the_mindspore_port(tiny_base):
    pytest.importorskip("mindspore")
    from lora_parity.backends.port.model import build_sdxl

    cfgs = PIPELINES[tiny_base.layout_name]
    src = tiny_base.sgm_weights()
    assert isinstance(src, DiffusersFolderWeights)
    te_cfgs = tuple(c for c in (cfgs.te1, cfgs.te2) if c is not None)
    shapes = build_sdxl(cfgs.layout(), te_cfgs, cfgs.vae, configure_runtime=False).param_shapes()
    assert set(shapes) <= src.names()
    for name, arr in src.load(sorted(shapes)):
        assert arr.dtype == np.float32 and tuple(arr.shape) == shapes[name], name
    with pytest.raises(LoraParityError, match="no_such_weight"):
        next(src.load(["model.diffusion_model.no_such_weight"]))


@pytest.mark.conversion
def test_diffusers_folder_spec_sharded_and_flat_clip_names(tiny_base, tmp_path):
    """A copy with the UNet in two fp16 shards and transformers-5 flat CLIP-L names (no ``text_model.``;
    generated bases use the Hub's prefixed names) reads the same."""
    b = tiny_base
    copy = tmp_path / "pipe"
    shutil.copytree(b.pipeline_dir, copy)
    unet_file = copy / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    tensors, meta = read_safetensors(unet_file)
    keys = list(tensors)
    unet_file.unlink()
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        write_safetensors(copy / "unet" / f"diffusion_pytorch_model.fp16-0000{i + 1}-of-00002.safetensors",
                          {k: tensors[k] for k in part}, meta)
    if not b.is_refiner:
        te = copy / "text_encoder" / "model.fp16.safetensors"
        t, meta = read_safetensors(te)
        assert all(k.startswith("text_model.") for k in t)
        write_safetensors(te, {k.removeprefix("text_model."): v for k, v in t.items()}, meta)
    resolved = resolve_base(str(copy), variant="fp16")
    assert (resolved.kind, resolved.layout_name, resolved.is_refiner) == (
        "diffusers", b.layout_name, b.is_refiner)
    assert resolved.default_image_size == TINY_IMAGE_SIZE
    ref, got = b.sgm_weights(), resolved.sgm_weights()
    assert ref.names() == got.names()
    names = sorted(ref.names())
    for (n, x), (_, y) in zip(ref.load(names), got.load(names)):
        assert x.tobytes() == y.tobytes(), n
    with pytest.raises(LoraParityError, match=r"bf16.*unet|unet.*bf16"):
        resolve_base(str(copy), variant="bf16")


# ----------------------------------------------------------------------------------------- single files


@pytest.mark.conversion
def test_single_file_round_trip_is_bitwise(tiny_base, tmp_path):
    b = tiny_base
    sf = write_single_file(b.pipeline_dir, tmp_path / f"{b.layout_name}.safetensors", b.variant)
    header, _ = read_safetensors(sf)
    assert not [k for k in header if k.endswith((".gamma", ".beta", ".embedding_table"))]
    te_prefix = "conditioner.embedders.0.model." if b.is_refiner else "conditioner.embedders.1.model."
    assert f"{te_prefix}transformer.resblocks.0.attn.in_proj_weight" in header
    assert f"{te_prefix}token_embedding.weight" in header
    assert header["model.diffusion_model.out.0.weight"].dtype == "F16"

    cache = tmp_path / "cache"
    got = resolve_base(str(sf), cache=cache)
    assert (got.kind, got.layout_name, got.is_refiner, got.variant, got.single_file) == (
        "single-file", b.layout_name, b.is_refiner, "fp16", sf)
    assert got.pipeline_dir.parent == cache / "single-file"
    for rel in (p.relative_to(b.pipeline_dir) for p in b.pipeline_dir.rglob("*.safetensors")):
        a, _ = read_safetensors(b.pipeline_dir / rel)
        c, _ = read_safetensors(got.pipeline_dir / rel)
        assert _same_tensors(a, c), rel
    ref, src = b.sgm_weights(), got.sgm_weights()
    assert isinstance(src, SingleFileWeights) and src.names() == ref.names()
    names = sorted(ref.names())
    for (n, x), (m, y) in zip(ref.load(names), src.load(names)):
        assert n == m and x.dtype == y.dtype == np.float32 and x.shape == y.shape and x.tobytes() == y.tobytes(), n
    mtimes = {p: p.stat().st_mtime_ns for p in got.pipeline_dir.rglob("*")}
    assert resolve_base(str(sf), cache=cache) == got
    assert {p: p.stat().st_mtime_ns for p in got.pipeline_dir.rglob("*")} == mtimes


@pytest.mark.conversion
def test_single_file_extra_and_missing_names_are_errors(tiny_base, tmp_path):
    b = tiny_base
    sf = write_single_file(b.pipeline_dir, tmp_path / "m.safetensors", b.variant)
    tensors, meta = read_safetensors(sf)
    extra = dict(tensors)
    extra["model.diffusion_model.some_new_layer.weight"] = tensors["model.diffusion_model.out.2.bias"]
    write_safetensors(tmp_path / "extra.safetensors", extra, meta)
    with pytest.raises(LoraParityError, match="extra.safetensors.*some_new_layer"):
        resolve_base(str(tmp_path / "extra.safetensors"), cache=tmp_path / "c")
    missing = {k: v for k, v in tensors.items() if not k.endswith("out.2.bias")}
    write_safetensors(tmp_path / "missing.safetensors", missing, meta)
    with pytest.raises(LoraParityError, match="missing.safetensors.*out.2.bias"):
        resolve_base(str(tmp_path / "missing.safetensors"), cache=tmp_path / "c")
    assert not (tmp_path / "c" / "single-file").exists() or not list((tmp_path / "c" / "single-file").iterdir())


@pytest.mark.parametrize("width,refiner,model", [(320, False, "sdxl-base"), (384, True, "sdxl-refiner")])
@pytest.mark.conversion
def test_single_file_detects_full_size_models(tmp_path, width, refiner, model):
    """Detection by names and shapes (a header-sized stand-in: the check then lists what is missing)."""
    from lora_parity.convert.tensor import Tensor

    t = {"model.diffusion_model.input_blocks.0.0.weight": Tensor.from_numpy(np.zeros((width, 4, 3, 3), np.float16))}
    te = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    t[f"{te}ln_final.weight"] = Tensor.from_numpy(np.ones(1280, np.float16))
    write_safetensors(tmp_path / "sd_xl.safetensors", t)
    with pytest.raises(LoraParityError, match=rf"sd_xl.safetensors.* {model} weight\(s\) missing"):
        resolve_base(str(tmp_path / "sd_xl.safetensors"), cache=tmp_path / "c")


# ----------------------------------------------------------------------------------------- full size, meta only


@pytest.mark.parametrize("model", ["sdxl-base", "sdxl-refiner"])
@pytest.mark.conversion
def test_full_size_tensor_list_is_what_param_maps_expects(model):
    """The generator's tensor list (meta device) is exactly the diffusers side of ``param_maps``."""
    cfgs = PIPELINES[model]
    names = set()
    for comp, cfg in cfgs.components().items():
        names |= set(normalize_diffusers_names({f"{comp}.{k}": 0 for k in meta_state_shapes(comp, cfg)}))
    maps = param_maps(cfgs.layout(), VaeLayout.from_diffusers_config(cfgs.vae))
    assert names == {d for m in maps for d in m.diffusers}
    assert ("text_encoder.text_model.final_layer_norm.weight" in names) == (not cfgs.is_refiner)


@pytest.mark.parametrize("model", ["sdxl-base", "sdxl-refiner"])
@pytest.mark.conversion
def test_full_size_sgm_shapes_equal_the_mindspore_cells(model):
    pytest.importorskip("mindspore")
    from lora_parity.backends.port.model import SDXL_VAE_CONFIG as PORT_VAE, param_shapes

    assert PORT_VAE == SDXL_VAE_CONFIG
    cfgs = PIPELINES[model]
    te_cfgs = tuple(c for c in (cfgs.te1, cfgs.te2) if c is not None)
    port = param_shapes(cfgs.layout(), te_configs=te_cfgs, vae_config=cfgs.vae)
    ours = expected_params(cfgs)
    assert set(port) <= set(ours)
    assert {n: ours[n][0] for n in port} == port
    # torch spellings of the official files: only MindSpore's norm/embedding leaf names change
    assert torch_spelling("model.diffusion_model.out.0.gamma") == "model.diffusion_model.out.0.weight"
    assert torch_spelling("conditioner.embedders.0.model.positional_embedding").endswith("positional_embedding")


# ----------------------------------------------------------------------------------------- bad specs, cache dir


@pytest.mark.conversion
def test_bad_specs_name_the_spec(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    bad = {"random:sdxl-large": "sdxl-large", "random:tiny:x": "random:tiny:x",
           str(tmp_path / "folder"): "model_index.json", str(tmp_path / "nope"): "nope",
           str(tmp_path / "junk.safetensors"): "junk.safetensors"}
    for spec, word in bad.items():
        with pytest.raises(LoraParityError, match=re.escape(word)):
            resolve_base(spec, cache=tmp_path / "c")
    ms_named = {"model.diffusion_model.out.0.gamma": np.ones(4, np.float32)}
    from lora_parity.convert.tensor import Tensor

    write_safetensors(tmp_path / "lora.safetensors", {k: Tensor.from_numpy(v) for k, v in ms_named.items()})
    with pytest.raises(LoraParityError, match="lora.safetensors.*not an SGM"):
        resolve_base(str(tmp_path / "lora.safetensors"), cache=tmp_path / "c")


@pytest.mark.conversion
def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_PARITY_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LORA_PARITY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "lora-parity"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "lora-parity"


# ------------------------------------------------------------------------- the init rule at full depth, narrow

# SDXL's depths (levels, layers per block, transformer depths, 32 CLIP layers, 4 VAE levels) at small
# widths: the rule scales by fan-in, so growth with depth is what these exercise, in seconds.
_NARROW_UNET = {"block_out_channels": [32, 64, 64], "attention_head_dim": [1, 2, 2], "norm_num_groups": 8,
                "cross_attention_dim": 64, "addition_time_embed_dim": 8, "sample_size": 16}
DEEP_NARROW = {
    "unet": {**PIPELINES["sdxl-base"].unet, **_NARROW_UNET, "projection_class_embeddings_input_dim": 6 * 8 + 32},
    "unet-refiner": {**PIPELINES["sdxl-refiner"].unet, **_NARROW_UNET, "block_out_channels": [32, 64, 64, 64],
                     "attention_head_dim": [1, 2, 2, 2], "projection_class_embeddings_input_dim": 5 * 8 + 32},
    "text_encoder": {**SDXL_TE1_CONFIG, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4},
    "text_encoder_2": {**SDXL_TE2_CONFIG, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                       "projection_dim": 32},
    "vae": {**SDXL_VAE_CONFIG, "block_out_channels": [16, 32, 64, 64], "norm_num_groups": 8},
}


def _generated(component: str, cfg: dict):
    """The model with weights from the random generator (fp16 values, run in float32)."""
    import torch

    from lora_parity.bases.configs import meta_model
    from lora_parity.bases.random_weights import random_tensor

    meta = meta_model(component, cfg)
    cls = type(meta)
    model = cls(meta.config) if component.startswith("text") else cls.from_config(meta.config)
    state = {k: torch.from_numpy(random_tensor(0, f"{component}.{k}", tuple(v.shape)).astype(np.float32))
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _rms(x) -> float:
    return float(x.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("which", sorted(DEEP_NARROW))
@pytest.mark.parity
def test_init_rule_keeps_full_depth_activations_finite_and_nontrivial(which):
    import torch

    lo, hi = ACTIVATION_RMS_RANGE
    component = "unet" if which.startswith("unet") else which
    cfg = DEEP_NARROW[which]
    model = _generated(component, cfg)
    g = torch.Generator().manual_seed(0)
    rms: list[float] = []
    with torch.no_grad():
        if component == "unet":
            blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
            for blk in blocks:
                for sub in [*getattr(blk, "resnets", []), *(getattr(blk, "attentions", None) or [])]:
                    sub.register_forward_hook(lambda m, a, out: rms.append(_rms(out[0] if isinstance(out, tuple)
                                                                                else out)))
            pooled = 32
            n_ids = (cfg["projection_class_embeddings_input_dim"] - pooled) // cfg["addition_time_embed_dim"]
            out = model(torch.randn(1, 4, 16, 16, generator=g), 500,
                        encoder_hidden_states=torch.randn(1, 77, cfg["cross_attention_dim"], generator=g),
                        added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g),
                                           "time_ids": torch.full((1, n_ids), 1024.0)}).sample
        elif component == "vae":
            for blk in [model.decoder.mid_block, *model.decoder.up_blocks]:
                for sub in [*blk.resnets, *(getattr(blk, "attentions", None) or [])]:
                    sub.register_forward_hook(lambda m, a, out: rms.append(_rms(out)))
            out = model.decode(torch.randn(1, 4, 8, 8, generator=g)).sample
        else:
            ids = torch.randint(0, 512, (1, 77), generator=g)
            ids[0, 0], ids[0, 20:] = cfg["bos_token_id"], cfg["eos_token_id"]
            res = model(ids, output_hidden_states=True)
            rms = [_rms(h) for h in res.hidden_states[1:]]
            out = res[0]
    assert len(rms) > 10 and torch.isfinite(out).all()
    assert all(lo < v < hi for v in rms), [round(v, 3) for v in rms]
    assert lo < _rms(out) < hi


@pytest.mark.parity
def test_sharded_writer_loads_shard_by_shard_in_diffusers(tiny_base, tmp_path):
    """``write_component_weights`` with a small shard limit writes save_pretrained's shard and index
    names; diffusers loads them (the full-size UNet is written in 1 GiB shards so it loads one shard
    at a time) and the values are the single file's, bitwise."""
    import torch
    from diffusers import UNet2DConditionModel

    from lora_parity.bases.sources import write_component_weights

    copy = tmp_path / "pipe"
    shutil.copytree(tiny_base.pipeline_dir, copy)
    unet_file = copy / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    tensors, meta = read_safetensors(unet_file)
    unet_file.unlink()
    paths = write_component_weights(copy / "unet", "diffusion_pytorch_model", "fp16",
                                    [(k, t.dtype, t.shape) for k, t in tensors.items()],
                                    (t.data for t in tensors.values()), meta, max_shard_bytes=64 * 1024)
    assert len(paths) > 2
    assert (copy / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    model = UNet2DConditionModel.from_pretrained(str(copy), subfolder="unet", variant="fp16",
                                                 torch_dtype=torch.float16, local_files_only=True)
    state = model.state_dict()
    assert set(state) == set(tensors)
    for k, t in tensors.items():
        assert state[k].numpy().tobytes() == t.data.tobytes(), k


@pytest.mark.conversion
def test_lazy_reads_are_bitwise_views_and_a_shrunk_file_names_the_key(tmp_path):
    """Tensors are read as views of the mapped file: bitwise, read-only (a caller cannot write into the
    file); a file cut short after its header was read is a one-line error naming the file and key."""
    from lora_parity.bases.sources import LazySafetensors, write_safetensors_streaming
    from lora_parity.errors import CheckpointFormatError

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float16), "b": rng.standard_normal((7,)).astype(np.float32)}
    path = tmp_path / "w.safetensors"
    write_safetensors_streaming(path, [("a", "F16", (3, 5)), ("b", "F32", (7,))], arrays.values())
    st = LazySafetensors(path)
    for k, want in arrays.items():
        got = st.read(k).data
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes() and got.shape == want.shape, k
        assert not got.flags.writeable
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 4)
    with pytest.raises(CheckpointFormatError) as exc:
        st.read("b")
    assert exc.value.path == str(path) and exc.value.key == "b", str(exc.value)
    assert "\n" not in str(exc.value)
