"""SD 1.x and SD 2.x LoRAs through the converter (issue 15, first part): the key map generated from their
layouts, PEFT and kohya names that diffusers' own loader takes completely (merged deltas equal), bitwise
round trips, layout detection, and a planted naming fault that the delta check catches.

SD 1.x projects into its transformers with 1x1 convs (conv LoRA shapes), SD 2.x linearly; sd-scripts names
their UNets by diffusers names (``lora_unet_down_blocks_0_…``), the text encoder ``lora_te_``.

The MindSpore side is MindONE's LDM port (``examples/stable_diffusion_v2``): ``LoRADenseLayer`` puts
``lora_down`` / ``lora_up`` beside each UNet attention projection and the text encoder's fused ``in_proj`` /
``out_proj``, saves only those plus ``lora_rank``, and runs with a ``--lora_scale`` (no alpha).  The fixture
writes such a file by hand from MindONE's parameter names, not through our writer.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import pytest

from lora_parity.convert import formats
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.convert import ckpt_io
from lora_parity.convert.keymap import keymap_for
from lora_parity.convert.layout import PRESETS
from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.convert.layout import tiny_sd_layout
from lora_parity.convert.tensor import Tensor
from lora_parity.errors import LoraParityError
from lora_parity.fixtures.synthetic import make_lora

from . import faults
from .test_diffusers_load import compare_deltas, load_into_pipeline, ms_side_deltas, pipeline_deltas

pytestmark = pytest.mark.conversion
FAMILIES = ("sd1", "sd2")
KOHYA_SD = re.compile(r"^lora_(unet_(conv_in|conv_out|(down_blocks|mid_block|up_blocks|time_embedding)_[a-z0-9_]+)"
                      r"|te_text_model_[a-z0-9_]+)\.(alpha|lora_down\.weight|lora_up\.weight)$")


LDM_RANK, LDM_SCALE = 4, 0.5  # the scale MindONE's --lora_scale was run with; alpha = scale * rank


def ldm_module_names(layout) -> list[str]:
    """What MindONE's LDM LoRA trains: UNet attention q/k/v/out, text-encoder fused in_proj and out_proj."""
    return [e.sgm for e in keymap_for(layout).lora_entries() if e.sgm.endswith(formats.LDM_LORA_SUFFIXES)]


def write_mindone_ldm_lora(path, lora) -> Path:
    """As ``save_checkpoint([trainable params], append_dict={"lora_rank": r})`` writes it: MindONE's names."""
    tensors = {}
    for p in lora.ordered():
        tensors[f"{p.module.sgm}.lora_down.weight"] = p.A
        tensors[f"{p.module.sgm}.lora_up.weight"] = p.B
    tensors["lora_rank"] = Tensor("I64", np.array(lora.ordered()[0].rank, dtype=np.int64).reshape(()))
    ckpt_io.write_ckpt(path, tensors)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, tiny pipeline folder, MindONE LDM LoRA .ckpt, its LoraSet, all-module kohya file, its LoraSet)."""
    from lora_parity.fixtures.tiny_pipeline import build_tiny_sd_pipeline

    fam = request.param
    root = tmp_path_factory.mktemp(f"tiny_{fam}")
    pipe_dir = build_tiny_sd_pipeline(root / "pipe", fam)
    layout = tiny_sd_layout(fam)
    lora = make_lora(layout, rank=LDM_RANK, alpha=LDM_SCALE * LDM_RANK, modules=ldm_module_names(layout), seed=5)
    src = write_mindone_ldm_lora(root / "lora.ckpt", lora)
    every = make_lora(layout, rank=4, alpha=8.0, modules="all", seed=6)
    every_src = root / "every_kohya.safetensors"
    write_safetensors(every_src, *formats.tensors_for(every, "kohya"))
    return fam, pipe_dir, src, lora, every_src, every


def _same_tensors(one: dict, two: dict) -> bool:
    return set(one) == set(two) and all(one[k].bitwise_equal(two[k]) for k in one)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_converted_sd_lora_loads_completely_in_diffusers(tmp_path, family, fmt):
    fam, pipe_dir, src, lora, _, _ = family
    out = tmp_path / f"{fmt}.safetensors"
    report = convert(ConvertOptions(src=src, dst=out, fmt=fmt, layout=str(pipe_dir), lora_scale=LDM_SCALE))
    assert report.modules == len(lora.pairs) and report.unmapped == []
    assert report.ignored_counts() == {formats.IGNORED_STATE: 1}  # lora_rank
    if fmt == "kohya":
        bad = [k for k in read_safetensors(out)[0] if not KOHYA_SD.match(k)]
        assert bad == [], bad[:3]
    assert compare_deltas(ms_side_deltas(lora), pipeline_deltas(load_into_pipeline(pipe_dir, out))) == []


def test_every_module_kind_loads_completely_in_diffusers(tmp_path, family):
    """Beyond what MindONE trains: conv (SD 1.x's 1x1 proj_in), resnets, ff, time embedding, text MLP."""
    fam, pipe_dir, _, _, every_src, every = family
    out = tmp_path / "peft.safetensors"
    convert(ConvertOptions(src=every_src, dst=out, fmt="peft", layout=str(pipe_dir)))
    assert compare_deltas(ms_side_deltas(every), pipeline_deltas(load_into_pipeline(pipe_dir, out))) == []


def test_sd_kohya_name_swap_is_caught(tmp_path, family, monkeypatch):
    """A writer that names attn1.to_q as attn1.to_k still loads completely; the deltas give it away."""
    fam, pipe_dir, src, lora, _, _ = family
    q = next(p.module.sgm for p in lora.ordered() if p.module.sgm.endswith("attn1.to_q"))
    faults.plant_kohya_name_swap(monkeypatch, lora.layout, q, q[:-1] + "k")
    out = tmp_path / "swapped.safetensors"
    convert(ConvertOptions(src=src, dst=out, fmt="kohya", layout="tiny-" + fam, lora_scale=LDM_SCALE))
    problems = compare_deltas(ms_side_deltas(lora), pipeline_deltas(load_into_pipeline(pipe_dir, out)))
    assert any("attn1.to_q" in p for p in problems) and any("attn1.to_k" in p for p in problems), problems


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_mindone_ldm_round_trip_is_bitwise(tmp_path, family, fmt):
    """MindONE .ckpt -> PEFT / kohya -> MindONE .ckpt gives the original file's tensors (lora_rank included)."""
    fam, _, src, lora, _, _ = family
    mid = tmp_path / f"mid_{fmt}.safetensors"
    convert(ConvertOptions(src=src, dst=mid, fmt=fmt, layout="tiny-" + fam, lora_scale=LDM_SCALE))
    again = tmp_path / "again.ckpt"
    report = convert(ConvertOptions(src=mid, dst=again, fmt="ms", layout="tiny-" + fam))
    assert _same_tensors(ckpt_io.read_ckpt(src), ckpt_io.read_ckpt(again))
    assert f"--lora_rank {LDM_RANK} --lora_scale {LDM_SCALE:g}" in report.scale_note
    # and the PyTorch-side file itself: PyTorch -> MindONE -> PyTorch gives the same tensors
    convert(ConvertOptions(src=again, dst=tmp_path / "mid2.safetensors", fmt=fmt, layout="tiny-" + fam,
                           lora_scale=LDM_SCALE))
    assert _same_tensors(read_safetensors(mid)[0], read_safetensors(tmp_path / "mid2.safetensors")[0])


def test_lora_scale_sets_alpha(tmp_path, family):
    fam, _, src, lora, _, _ = family
    out = tmp_path / "peft.safetensors"
    convert(ConvertOptions(src=src, dst=out, fmt="peft", layout="tiny-" + fam, lora_scale=2.0))
    assert set(load_lora(out, layout=lora.layout).alphas()) == {2.0 * LDM_RANK}
    assert set(load_lora(src, layout=lora.layout).alphas()) == {float(LDM_RANK)}  # MindONE's default scale 1


def test_all_module_kohya_and_peft_round_trip_bitwise(tmp_path, family):
    fam, _, _, _, every_src, _ = family
    peft = tmp_path / "peft.safetensors"
    convert(ConvertOptions(src=every_src, dst=peft, fmt="peft", layout="tiny-" + fam))
    back = tmp_path / "kohya.safetensors"
    convert(ConvertOptions(src=peft, dst=back, fmt="kohya", layout="tiny-" + fam))
    assert _same_tensors(read_safetensors(every_src)[0], read_safetensors(back)[0])


def test_mindone_ldm_writer_refuses_what_its_loader_drops(tmp_path, family, capsys):
    """A ff / resnet / conv LoRA written into MindONE's LDM names would load nothing there: one-line refusal
    naming a key, exit 2 (bad input), no output file."""
    from lora_parity.cli import main

    fam, _, _, _, every_src, _ = family
    out = tmp_path / "x.ckpt"
    rc = main(["convert", str(every_src), "-o", str(out), "--format", "ms", "--layout", "tiny-" + fam])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "LoRADenseLayer" in err and re.search(r"lora_(unet|te)_\w+", err), err


def test_mindone_ldm_mixed_ranks_are_refused(tmp_path, family):
    fam, _, _, lora, _, _ = family
    names = list(lora.pairs)
    other = make_lora(lora.layout, rank=2, modules=names[:1], seed=9)
    mixed = dict(lora.pairs)
    mixed.update(other.pairs)
    for p in mixed.values():
        mixed[p.module.sgm] = type(p)(p.module, p.A, p.B, LDM_SCALE * p.rank)
    peft = tmp_path / "mixed.safetensors"
    write_safetensors(peft, *formats.tensors_for(type(lora)(mixed, lora.layout, "", "ms"), "peft"))
    with pytest.raises(LoraParityError, match="one lora_rank"):
        convert(ConvertOptions(src=peft, dst=tmp_path / "x.ckpt", fmt="ms", layout="tiny-" + fam))


def test_lora_rank_that_disagrees_with_the_tensors_is_refused(tmp_path, family):
    fam, _, src, lora, _, _ = family
    tensors = ckpt_io.read_ckpt(src)
    tensors["lora_rank"] = Tensor("I64", np.array(LDM_RANK * 2, dtype=np.int64).reshape(()))
    bad = tmp_path / "bad.ckpt"
    ckpt_io.write_ckpt(bad, tensors)
    with pytest.raises(LoraParityError, match="differs from the file's lora_rank"):
        load_lora(bad, layout=lora.layout)


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_real_size_sd_lora_layout_is_detected(tmp_path, preset):
    lora = make_lora(PRESETS[preset], rank=4, modules=ldm_module_names(PRESETS[preset]), seed=2)
    src = write_mindone_ldm_lora(tmp_path / "lora.ckpt", lora)
    got = load_lora(src)
    assert got.layout.name == preset and "detected" in got.layout_note and len(got.pairs) == len(lora.pairs)
    out = tmp_path / "kohya.safetensors"
    convert(ConvertOptions(src=src, dst=out, fmt="kohya"))
    names = set(read_safetensors(out)[0])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in names
    assert load_lora(out).layout.name == preset


def test_sd1_proj_in_is_a_conv_lora(family):
    fam, _, _, _, _, every = family
    p = next(p for n, p in every.pairs.items() if n.endswith(".proj_in"))
    assert (len(p.A.shape), len(p.B.shape)) == ((4, 4) if fam == "sd1" else (2, 2))


def test_text_encoder_is_fused_on_the_mindone_side(family):
    """MindONE's LDM TextEncoder keeps q/k/v fused for CLIP-L and OpenCLIP-H alike
    (``cond_stage_model.transformer.transformer_layer.resblocks.N.attn.attn.in_proj``); PEFT gives q/k/v_proj
    one shared lora_A (MindONE's one lora_down) and lora_up's rows in q, k, v order."""
    fam, _, _, lora, _, _ = family
    fused = [p for n, p in lora.pairs.items() if n.endswith("attn.attn.in_proj")]
    assert fused and all(p.module.sgm.startswith("cond_stage_model.transformer.transformer_layer.resblocks.")
                         for p in fused)
    tensors, _ = formats.tensors_for(lora, "peft")
    p = fused[0]
    n = p.module.sgm.split(".resblocks.")[1].split(".")[0]
    rows = p.B.shape[0] // 3
    for i, proj in enumerate("qkv"):
        base = f"text_encoder.text_model.encoder.layers.{n}.self_attn.{proj}_proj"
        assert tensors[f"{base}.lora_A.weight"].bitwise_equal(p.A)
        assert np.array_equal(tensors[f"{base}.lora_B.weight"].data, p.B.data[i * rows:(i + 1) * rows])
