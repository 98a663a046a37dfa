"""Round trips MS -> PT -> MS and PT -> MS -> PT are bitwise, whatever the key order."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from lora_parity.convert import ckpt_io, formats
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.convert.layout import PRESETS
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.fixtures.synthetic import make_lora, training_extras, write_ms_lora
from lora_parity.convert.layout import tiny_layout

pytestmark = pytest.mark.conversion

DTYPES = ("F32", "F16", "BF16")


def _tensors(path: Path):
    tensors, _, _ = formats.read_tensors(path)
    return tensors


def _assert_bitwise(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    bad = [k for k in a if not a[k].bitwise_equal(b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_ms_pt_ms_is_bitwise_on_sdxl_base(tmp_path, dtype, fmt):
    lora = make_lora(PRESETS["sdxl-base"], rank=4, dtype=dtype, seed=1)
    src = write_ms_lora(tmp_path / "lora.ckpt", lora)
    convert(ConvertOptions(src=src, fmt=fmt))
    pt = tmp_path / "lora_pt.safetensors"
    convert(ConvertOptions(src=pt, dst=tmp_path / "back.ckpt"))
    _assert_bitwise(_tensors(src), _tensors(tmp_path / "back.ckpt"))
    assert (tmp_path / "back.ckpt").read_bytes() == src.read_bytes()  # same names, order, bytes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_pt_ms_pt_is_bitwise_with_text_encoders(tmp_path, dtype, fmt):
    lora = make_lora(tiny_layout(), rank=3, alpha=6.0, modules="all", dtype=dtype, seed=2)
    pt = tmp_path / f"lora.{fmt}.safetensors"
    write_safetensors(pt, *formats.tensors_for(lora, fmt))
    convert(ConvertOptions(src=pt, dst=tmp_path / "ms.ckpt", layout="tiny"))
    convert(ConvertOptions(src=tmp_path / "ms.ckpt", dst=tmp_path / "again.safetensors", fmt=fmt,
                           layout="tiny", alpha=6.0))
    _assert_bitwise(_tensors(pt), _tensors(tmp_path / "again.safetensors"))
    _, meta1 = read_safetensors(pt)
    _, meta2 = read_safetensors(tmp_path / "again.safetensors")
    assert meta1.get(formats.ADAPTER_METADATA_KEY) == meta2.get(formats.ADAPTER_METADATA_KEY)


@st.composite
def lora_cases(draw):
    layout = tiny_layout()
    rank = draw(st.integers(1, 8))
    alpha = draw(st.sampled_from([None, 1.0, 0.5, 3.0, 16.0]))
    from lora_parity.convert.keymap import keymap_for

    entries = keymap_for(layout).lora_entries()
    subset = draw(st.lists(st.sampled_from([e.sgm for e in entries]), min_size=1, max_size=20, unique=True))
    dtype = draw(st.sampled_from(DTYPES))
    fmt = draw(st.sampled_from(["peft", "kohya"]))
    seed = draw(st.integers(0, 2 ** 16))
    return layout, rank, alpha, subset, dtype, fmt, seed


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lora_cases())
def test_round_trip_property_any_order(tmp_path_factory, case):
    layout, rank, alpha, subset, dtype, fmt, seed = case
    d = tmp_path_factory.mktemp("rt")
    lora = make_lora(layout, rank=rank, alpha=alpha, modules=subset, dtype=dtype, seed=seed)
    tensors, _ = formats.tensors_for(lora, "ms")
    items = list(tensors.items())
    random.Random(seed).shuffle(items)  # order must never matter
    src = d / "src.ckpt"
    ckpt_io.write_ckpt(src, dict(items))
    convert(ConvertOptions(src=src, dst=d / "pt.safetensors", fmt=fmt, layout="tiny", alpha=alpha))
    # shuffle the PT file too
    pt_tensors, meta = read_safetensors(d / "pt.safetensors")
    pt_items = list(pt_tensors.items())
    random.Random(seed + 1).shuffle(pt_items)
    write_safetensors(d / "pt_shuffled.safetensors", dict(pt_items), meta)
    convert(ConvertOptions(src=d / "pt_shuffled.safetensors", dst=d / "back.ckpt", layout="tiny"))
    _assert_bitwise(tensors, _tensors(d / "back.ckpt"))
    back = load_lora(d / "back.ckpt", layout=tiny_layout(), alpha=alpha)
    again = load_lora(d / "pt_shuffled.safetensors", layout=tiny_layout())
    assert {k: p.alpha for k, p in again.pairs.items()} == {k: p.alpha for k, p in back.pairs.items()}


def test_dtype_option_casts_and_keeps_names(tmp_path):
    lora = make_lora(tiny_layout(), rank=2, seed=3)
    src = write_ms_lora(tmp_path / "l.ckpt", lora)
    for name, canon in (("fp16", "F16"), ("bf16", "BF16"), ("fp32", "F32")):
        out = tmp_path / f"{name}.safetensors"
        convert(ConvertOptions(src=src, dst=out, dtype=name, layout="tiny"))
        t = _tensors(out)
        assert {x.dtype for x in t.values()} == {canon}
        assert len(t) == 2 * len(lora.pairs)


def test_training_checkpoint_extras_are_listed_and_skipped(tmp_path):
    lora = make_lora(PRESETS["sdxl-base"], rank=4, seed=4)
    extras = training_extras(lora)
    src = write_ms_lora(tmp_path / "train.ckpt", lora, extras=extras)
    report = convert(ConvertOptions(src=src))
    assert sorted(report.skipped) == sorted(extras)
    assert report.modules == 560 and report.tensors_written == 1120
    assert "skipped 8 non-LoRA entries" in report.summary()
    assert "sdxl-base" in report.layout_note and "detected" in report.layout_note


def test_refiner_is_detected_and_base_is_not_confused(tmp_path):
    ref = write_ms_lora(tmp_path / "ref.ckpt", make_lora(PRESETS["sdxl-refiner"], rank=4, modules="all"))
    assert "sdxl-refiner" in load_lora(ref).layout_note
    base = write_ms_lora(tmp_path / "base.ckpt", make_lora(PRESETS["sdxl-base"], rank=8, modules="all"))
    assert "sdxl-base" in load_lora(base).layout_note


def test_fused_in_proj_splits_and_fuses_back_exactly(tmp_path):
    layout = tiny_layout()
    name = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj"
    lora = make_lora(layout, rank=2, modules=[name], seed=5)
    pt, _ = formats.tensors_for(lora, "peft")
    q, k, v = (pt[f"text_encoder_2.text_model.encoder.layers.0.self_attn.{p}_proj.lora_B.weight"] for p in "qkv")
    import numpy as np
    assert np.array_equal(np.concatenate([q.data, k.data, v.data]), lora.pairs[name].B.data)
    a_keys = [f"text_encoder_2.text_model.encoder.layers.0.self_attn.{p}_proj.lora_A.weight" for p in "qkv"]
    assert all(pt[a].bitwise_equal(lora.pairs[name].A) for a in a_keys)


def test_peft_from_flattened_clip_text_model_is_understood(tmp_path):
    """diffusers + transformers 5 save CLIP-L LoRA keys without 'text_model.': same modules."""
    lora = make_lora(tiny_layout(), rank=2, modules="linear", seed=7)
    tensors, meta = formats.tensors_for(lora, "peft")
    flat = {k.replace("text_encoder.text_model.", "text_encoder.", 1) if k.startswith("text_encoder.") else k: t
            for k, t in tensors.items()}
    assert any(k.startswith("text_encoder.encoder.layers.") for k in flat)
    write_safetensors(tmp_path / "flat.safetensors", flat, meta)
    convert(ConvertOptions(src=tmp_path / "flat.safetensors", dst=tmp_path / "ms.ckpt", layout="tiny"))
    _assert_bitwise(formats.tensors_for(lora, "ms")[0], _tensors(tmp_path / "ms.ckpt"))
