"""fixtures/: files written by the real tools (MindSpore, diffusers + PEFT, sd-scripts' layout), read,
converted and checked; the official single files' name lists against our full-weight map; report.json's
structure.  How each file was made: fixtures/README.md (regenerate: scripts/make_fixtures.py).
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import ckpt_io, formats
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.errors import LoraParityError
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.convert.tensor import ms_name
from lora_parity.convert.layout import tiny_layout

from .helpers import run_cli

# every test is `conversion` (seconds, no forward pass) but the one fresh `compare` run, which is `parity`
conversion = pytest.mark.conversion

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MAX_TOTAL_BYTES = 5 * 1024 * 1024
MS_FILES = {"F32": "mindone_lora_f32.ckpt", "F16": "mindone_lora_f16.ckpt",
            "BF16": "mindone_lora_bf16.ckpt", "F64": "mindone_lora_f64.ckpt"}
PEFT_FILE = FIXTURES / "diffusers_peft.safetensors"
TRAIN_SCRIPT_FILE = FIXTURES / "diffusers_sdxl_train_script.safetensors"
KOHYA_FILE = FIXTURES / "kohya_sdxl.safetensors"
NAME_LISTS = {"sd_xl_base_1.0.names.tsv": "sdxl-base", "sd_xl_refiner_1.0.names.tsv": "sdxl-refiner"}
POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2)_([a-z0-9_]+)\.(alpha|lora_down\.weight|lora_up\.weight)$")
BIGG_QKV = re.compile(r"^lora_te2_.*_self_attn_[qkv]_proj\.")


def _bitwise(a: dict, b: dict) -> list[str]:
    """Keys of ``a`` whose tensor differs from ``b``'s (dtype, shape or bytes), plus keys only on one side."""
    diff = sorted(set(a) ^ set(b))
    return diff + [k for k in a if k in b and not a[k].bitwise_equal(b[k])]


# ---------------------------------------------------------------- the folder itself

def _listed() -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", (FIXTURES / "README.md").read_text(), flags=re.M)


@conversion
def test_readme_lists_every_file_and_nothing_else():
    listed = _listed()
    assert len(listed) == len(set(listed)), "a file is listed twice"
    present = sorted(p.name for p in FIXTURES.iterdir() if p.name != "README.md")
    assert sorted(listed) == present, (f"listed, missing: {sorted(set(listed) - set(present))}; "
                                       f"present, not listed: {sorted(set(present) - set(listed))}")
    assert all((FIXTURES / p).is_file() for p in present), "fixtures/ holds plain files only"


@conversion
def test_fixtures_stay_small():
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total < MAX_TOTAL_BYTES, f"fixtures/ holds {total:,} bytes (limit {MAX_TOTAL_BYTES:,})"


# ---------------------------------------------------------------- MindONE .ckpt written by MindSpore

@conversion
@pytest.mark.parametrize("dtype", MS_FILES)
def test_mindone_ckpt_reads_as_mindspore_loads_it(dtype):
    ms = pytest.importorskip("mindspore")
    path = FIXTURES / MS_FILES[dtype]
    ours = ckpt_io.read_ckpt(path)
    theirs = ms.load_checkpoint(str(path))
    assert list(ours) == list(theirs)  # same names, same order
    for name, t in ours.items():
        p = theirs[name]
        assert (t.dtype, str(p.dtype)) == (dtype, ms_name(dtype)), name
        assert t.shape == tuple(p.shape), name
        raw = p.asnumpy()  # bfloat16 arrives as ml_dtypes' bfloat16: its bytes are the raw bits
        assert raw.dtype.itemsize == t.data.dtype.itemsize and raw.tobytes() == t.data.tobytes(), name


@conversion
@pytest.mark.parametrize("dtype", MS_FILES)
def test_mindone_ckpt_converts_to_peft_and_back_bitwise(tmp_path, dtype):
    src = FIXTURES / MS_FILES[dtype]
    original = ckpt_io.read_ckpt(src)
    report = convert(ConvertOptions(src=src, dst=tmp_path / "pt.safetensors", layout="tiny"))
    assert report.modules * 2 == len(original) and report.src_format == "ms"
    pt, meta = read_safetensors(tmp_path / "pt.safetensors")
    assert {t.dtype for t in pt.values()} == {dtype}
    assert json.loads(meta[formats.ADAPTER_METADATA_KEY])["unet.lora_alpha"] == 4  # no alpha stored: = rank
    convert(ConvertOptions(src=tmp_path / "pt.safetensors", dst=tmp_path / "back.ckpt", layout="tiny"))
    assert _bitwise(original, ckpt_io.read_ckpt(tmp_path / "back.ckpt")) == []
    # our writer reproduces MindSpore 2.10's save_checkpoint byte for byte (order, framing, dtype names)
    assert (tmp_path / "back.ckpt").read_bytes() == src.read_bytes()


# ---------------------------------------------------------------- diffusers' save_lora_weights

@conversion
def test_diffusers_file_records_alpha_in_header_and_is_read_so():
    tensors, meta = read_safetensors(PEFT_FILE)
    assert not any(k.endswith(".alpha") for k in tensors)  # PEFT format: no alpha tensors
    adapter = json.loads(meta[formats.ADAPTER_METADATA_KEY])
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        assert (adapter[f"{comp}.r"], adapter[f"{comp}.lora_alpha"]) == (4, 8), comp
    lora = load_lora(PEFT_FILE, layout=tiny_layout())
    assert lora.source_format == "peft"
    assert {(p.rank, p.alpha, p.scale) for p in lora.pairs.values()} == {(4, 8.0, 2.0)}
    assert sum(len(p.module.diffusers) for p in lora.pairs.values()) * 2 == len(tensors)


@conversion
def test_diffusers_file_converts_to_mindone_and_back_bitwise(tmp_path):
    original, meta = read_safetensors(PEFT_FILE)
    report = convert(ConvertOptions(src=PEFT_FILE, dst=tmp_path / "ms.ckpt", layout="tiny"))
    assert report.dst_format == "ms" and report.alphas == Counter({8.0: report.modules})
    convert(ConvertOptions(src=tmp_path / "ms.ckpt", dst=tmp_path / "again.safetensors", fmt="peft",
                           layout="tiny", alpha=8.0))
    again, meta2 = read_safetensors(tmp_path / "again.safetensors")
    # transformers 5 names CLIP-L's modules without "text_model." (diffusers 0.42 wrote them so);
    # our writer spells them as transformers 4 and the Hub do, which diffusers loads under either
    renamed = {k.replace("text_encoder.text_model.", "text_encoder.", 1): t for k, t in again.items()}
    assert _bitwise(original, renamed) == []
    a1, a2 = json.loads(meta[formats.ADAPTER_METADATA_KEY]), json.loads(meta2[formats.ADAPTER_METADATA_KEY])
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        assert (a2[f"{comp}.r"], a2[f"{comp}.lora_alpha"]) == (a1[f"{comp}.r"], a1[f"{comp}.lora_alpha"])


@conversion
def test_diffusers_sdxl_training_script_file_reads_like_the_peft_one():
    """The old diffusers names (`unet.….lora.down.weight`, `text_encoder….lora_linear_layer.up.weight`) that
    diffusers' SDXL LoRA training scripts save via convert_state_dict_to_diffusers: the same tensors."""
    got = load_lora(TRAIN_SCRIPT_FILE, layout=tiny_layout())
    assert got.source_format == "peft" and got.unmapped == []
    want = load_lora(PEFT_FILE, layout=tiny_layout(), alpha=4.0)  # no metadata: alpha = rank
    assert set(got.pairs) == set(want.pairs)
    for name, p in want.pairs.items():
        assert p.A.bitwise_equal(got.pairs[name].A) and p.B.bitwise_equal(got.pairs[name].B), name
        assert got.pairs[name].alpha == 4.0


# ---------------------------------------------------------------- sd-scripts' layout (kohya)

@conversion
def test_kohya_file_has_sd_scripts_names_alphas_and_metadata():
    tensors, meta = read_safetensors(KOHYA_FILE)
    bad = [k for k in tensors if not KOHYA_KEY.match(k)]
    assert bad == [], bad[:3]
    modules = Counter(k.split(".", 1)[0] for k in tensors)
    assert set(modules.values()) == {3}, "each module: alpha, lora_down.weight, lora_up.weight"
    assert {k.split("_", 2)[1] for k in modules} == {"unet", "te1", "te2"}
    for name in modules:
        alpha = tensors[f"{name}.alpha"]
        assert alpha.shape == () and alpha.dtype == "F16" and float(alpha.to_float()) == 8.0, name
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == 4 and down.dtype == up.dtype == "F16", name
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in modules
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_out_0" in modules
    assert "lora_unet_middle_block_1_proj_in" in modules
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"],
            meta["ss_base_model_version"]) == ("networks.lora", "4", "8.0", "sdxl_base_v1-0")
    # sd-webui-additional-networks' hash: sha256 of the data section (metadata does not enter it)
    blob = KOHYA_FILE.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header_len:]).hexdigest()


@conversion
def test_kohya_bigG_qkv_fuse_into_one_exact_in_proj_lora():
    """sd-scripts trains bigG's q/k/v as three rank-r LoRAs: one rank-3r in_proj LoRA (A stacked, B
    block-diagonal, alpha 3a keeps alpha/r) whose merged delta is the three parts' deltas, value for value."""
    tensors, _ = read_safetensors(KOHYA_FILE)
    lora = load_lora(KOHYA_FILE, layout=tiny_layout())
    assert lora.unmapped == [] and len(lora.pairs) == len({k.split(".", 1)[0] for k in tensors}) - 2 * 3
    fused = [p for p in lora.ordered() if p.part_ranks]
    assert fused and all(p.module.sgm.endswith("attn.in_proj") for p in fused)
    for p in fused:
        assert (p.part_ranks, p.rank, p.alpha, p.scale) == ((4, 4, 4), 12, 24.0, 2.0)
        layer = re.search(r"resblocks\.(\d+)\.", p.module.sgm).group(1)
        parts = []
        for proj in ("q", "k", "v"):
            kn = f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{proj}_proj"
            down = tensors[f"{kn}.lora_down.weight"].to_float()
            up = tensors[f"{kn}.lora_up.weight"].to_float()
            parts.append(float(tensors[f"{kn}.alpha"].to_float()) / down.shape[0] * (up @ down))
        np.testing.assert_array_equal(p.delta(), np.concatenate(parts, axis=0))


@conversion
@pytest.mark.parametrize("via", ["kohya", "peft"])
def test_kohya_file_converts_whole_and_back_bitwise(tmp_path, via):
    original, _ = read_safetensors(KOHYA_FILE)
    mid = tmp_path / f"mid_{via}.safetensors"
    convert(ConvertOptions(src=KOHYA_FILE, dst=mid, fmt=via, layout="tiny"))
    if via == "peft":  # q/k/v each rank 4, alpha 8 again
        meta = json.loads(read_safetensors(mid)[1][formats.ADAPTER_METADATA_KEY])
        assert meta["text_encoder_2.alpha_pattern"] == {} and meta["text_encoder_2.rank_pattern"] == {}
    convert(ConvertOptions(src=mid, dst=tmp_path / "again.safetensors", fmt="kohya", layout="tiny"))
    again, _ = read_safetensors(tmp_path / "again.safetensors")
    assert _bitwise(original, again) == []


def _kohya_at_scale_one(tmp_path) -> Path:
    tensors, meta = read_safetensors(KOHYA_FILE)
    four = next(t for k, t in tensors.items() if k.endswith(".lora_down.weight")).shape[0]
    scaled = {k: (formats.kohya_alpha(float(four), t.dtype) if k.endswith(".alpha") else t)
              for k, t in tensors.items()}
    src = tmp_path / "kohya_alpha_rank.safetensors"
    write_safetensors(src, scaled, meta)
    return src


@conversion
def test_kohya_bigG_qkv_through_a_mindone_ckpt_and_back_bitwise(tmp_path):
    """alpha = rank everywhere: the .ckpt (no alpha, MindONE's default scale 1) holds the fused rank-12
    in_proj exactly, and the block-diagonal lora_B splits back into the three sd-scripts LoRAs."""
    src = _kohya_at_scale_one(tmp_path)
    report = convert(ConvertOptions(src=src, dst=tmp_path / "ms.ckpt", layout="tiny"))
    assert "scale 1" in report.scale_note and 12 in report.ranks
    convert(ConvertOptions(src=tmp_path / "ms.ckpt", dst=tmp_path / "again.safetensors", fmt="kohya",
                           layout="tiny"))
    again, _ = read_safetensors(tmp_path / "again.safetensors")
    assert _bitwise(read_safetensors(src)[0], again) == []


@conversion
def test_kohya_bigG_qkv_with_alpha_not_rank_refused_as_mindone_ckpt(tmp_path):
    """alpha 8, rank 4: the fused in_proj needs alpha 24 beside 8 elsewhere, which one lora_alpha cannot
    give; refused in one line naming the file, nothing written."""
    code, _, err = run_cli(["convert", str(KOHYA_FILE), "-o", str(tmp_path / "ms.ckpt"), "--layout", "tiny"])
    assert code == 2 and "fused in_proj" in err and str(KOHYA_FILE) in err and "Traceback" not in err
    assert not (tmp_path / "ms.ckpt").exists()


@conversion
def test_kohya_file_converts_and_back_bitwise_without_bigG_qkv(tmp_path):
    tensors, meta = read_safetensors(KOHYA_FILE)
    subset = {k: t for k, t in tensors.items() if not BIGG_QKV.match(k)}
    assert 0 < len(tensors) - len(subset) < len(tensors) // 4
    src = tmp_path / "kohya.safetensors"
    write_safetensors(src, subset, meta)
    lora = load_lora(src, layout=tiny_layout())
    assert lora.source_format == "kohya" and {(p.rank, p.alpha) for p in lora.pairs.values()} == {(4, 8.0)}
    convert(ConvertOptions(src=src, dst=tmp_path / "ms.ckpt", layout="tiny"))
    convert(ConvertOptions(src=tmp_path / "ms.ckpt", dst=tmp_path / "again.safetensors", fmt="kohya",
                           layout="tiny", alpha=8.0))
    again, _ = read_safetensors(tmp_path / "again.safetensors")
    assert _bitwise(subset, again) == []  # same names, lora_down/up bytes, 0-d fp16 alphas


# ---------------------------------------------------------------- official single-file name lists

def _name_list(fname: str) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in (FIXTURES / fname).read_text().splitlines():
        name, shape, dtype = line.split("\t")
        assert name not in rows, f"{fname}: {name} listed twice"
        rows[name] = (tuple(json.loads(shape)), dtype)
    return rows


@pytest.fixture(scope="module")
def expected_single_file():
    from lora_parity.bases.configs import PIPELINES
    from lora_parity.bases.single_file import expected_params, torch_spelling

    return {model: {torch_spelling(n): tuple(s) for n, (s, _) in expected_params(PIPELINES[model]).items()}
            for model in NAME_LISTS.values()}


@conversion
@pytest.mark.parametrize("fname", NAME_LISTS)
def test_single_file_name_list_matches_the_full_weight_map(fname, expected_single_file):
    rows = _name_list(fname)
    expected = expected_single_file[NAME_LISTS[fname]]
    extra = sorted(set(rows) - set(expected))
    assert extra == ([POSITION_IDS] if NAME_LISTS[fname] == "sdxl-base" else []), extra[:5]
    missing = sorted(set(expected) - set(rows))
    assert missing == [], missing[:5]
    shapes = [n for n in expected if rows[n][0] != expected[n]]
    assert shapes == [], [(n, rows[n][0], expected[n]) for n in shapes[:5]]
    assert Counter(d for _, d in rows.values()) == Counter(F16=len(expected), **({"I64": 1} if extra else {}))


@conversion
@pytest.mark.parametrize("fname", NAME_LISTS)
def test_single_file_reader_accepts_the_official_names(tmp_path, fname):
    """A header-only (sparse) safetensors file with the official names, shapes and dtypes is taken as that model."""
    from lora_parity.bases.single_file import SingleFileWeights
    from lora_parity.convert.tensor import itemsize

    header, offset = {}, 0
    for name, (shape, dtype) in _name_list(fname).items():
        size = int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path = tmp_path / fname.replace(".names.tsv", ".safetensors")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)  # sparse: the 6-7 GB of data take no disk
    weights = SingleFileWeights(path)
    assert weights.cfgs.name == NAME_LISTS[fname] and weights.variant == "fp16"


# ---------------------------------------------------------------- report.json structure

SCHEMA = json.loads((FIXTURES / "report.schema.json").read_text())
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value, typ: str) -> bool:
    if typ in ("integer", "number"):
        ok = isinstance(value, int) if typ == "integer" else isinstance(value, (int, float))
        return ok and not isinstance(value, bool)
    return isinstance(value, _TYPES[typ])


def schema_errors(value, schema: dict, path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the JSON-Schema subset fixtures/report.schema.json uses)."""
    if "$ref" in schema:
        return schema_errors(value, SCHEMA["$defs"][schema["$ref"]], path)
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(value, t) for t in types):
            return [f"{path}: {type(value).__name__}, expected {' or '.join(types)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(value)} items, at least {schema['minItems']} expected")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        errors += [f"{path}: no '{k}'" for k in schema.get("required", ()) if k not in value]
        props, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        for key, item in value.items():
            where = f"{path}.{key}"
            if key in props:
                errors += schema_errors(item, props[key], where)
            elif any(re.search(p, key) for p in patterns):
                errors += [e for p, s in patterns.items() if re.search(p, key) for e in schema_errors(item, s, where)]
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{where}: not in the schema")
    return errors


@conversion
def test_golden_report_matches_the_schema():
    golden = json.loads((FIXTURES / "report.json").read_text())
    assert schema_errors(golden, SCHEMA) == []
    assert golden["passed"] is True and golden["image"] is not None


@conversion
def test_schema_check_fails_on_a_broken_report():
    golden = json.loads((FIXTURES / "report.json").read_text())
    broken = json.loads(json.dumps(golden))
    del broken["meta"]["tolerance"]
    broken["layers"][3]["rel_err"] = "0.1"
    broken["layers"][5]["surprise"] = 1
    broken["first_diverging_layer"] = []
    errors = schema_errors(broken, SCHEMA)
    assert len(errors) == 4 and any("$.meta: no 'tolerance'" in e for e in errors), errors
    assert any(e.startswith("$.layers[3].rel_err") for e in errors), errors
    assert any(e.startswith("$.layers[5].surprise") for e in errors), errors
    flagged = json.loads(json.dumps(golden))
    flagged["layers"][0].update(rel_err=None, rel_err_nan=True)  # a non-finite value, as report.py writes it
    assert schema_errors(flagged, SCHEMA) == []


@pytest.mark.parity
def test_current_compare_report_matches_the_schema(tmp_path):
    """A fresh ``compare`` on the built-in fixture writes the structure the golden one has (pass or fail)."""
    run = [sys.executable, "-m", "lora_parity"]
    subprocess.run(run + ["fixture", "fx"], cwd=tmp_path, check=True, capture_output=True)
    res = subprocess.run(run + ["compare", "--pt-base", "fx/pt_base", "--ms-base", "fx/ms_base.ckpt",
                                "--ms-lora", "fx/ms_lora.ckpt", "--steps", "2", "--report", "report"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode in (0, 1), res.stderr[-2000:]  # 1 = parity failure: still a full report
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert schema_errors(report, SCHEMA) == []
    golden = json.loads((FIXTURES / "report.json").read_text())
    assert [(m["sgm"], m["component"]) for m in report["layers"]] == \
           [(m["sgm"], m["component"]) for m in golden["layers"]]
