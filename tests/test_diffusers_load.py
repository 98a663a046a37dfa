"""The converted file loads completely in diffusers, and its merged deltas equal the MindSpore side's.

Also shows the checks can fail: swapped projections or a dropped block are caught.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import formats
from lora_parity.convert.converter import ConvertOptions, convert, load_lora
from lora_parity.convert.keymap import keymap_for
from lora_parity.convert.lora_set import LoraSet
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora
from lora_parity.parity.tolerances import CONVERSION_DELTA

from . import faults

pytestmark = pytest.mark.conversion

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def load_into_pipeline(pipeline_dir: Path, lora_file: Path):
    """The pipeline with the LoRA loaded by diffusers; raises LoraLoadError unless every key landed."""
    from diffusers import DiffusionPipeline

    from lora_parity.backends.diffusers.view import load_lora_checked

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)  # SDXL, or SD 1.x / 2.x (tests/test_families.py)
    load_lora_checked(pipe, lora_file)
    return pipe


def pipeline_deltas(pipe) -> dict[str, np.ndarray]:
    """diffusers-name -> scaling * B @ A (float64) for every LoRA layer PEFT attached."""
    out = {}
    for comp in LORA_COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:  # SD 1.x / 2.x: one text encoder
            continue
        flat = comp == "text_encoder" and not hasattr(model, "text_model")
        for name, mod in model.named_modules():
            if not hasattr(mod, "lora_A") or not len(mod.lora_A):
                continue
            (adapter,) = list(mod.lora_A.keys())
            a = mod.lora_A[adapter].weight.detach().double().numpy()
            b = mod.lora_B[adapter].weight.detach().double().numpy()
            scale = mod.scaling[adapter]
            delta = scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
            full = f"{comp}.{'text_model.' if flat else ''}{name}"
            out[full] = delta
    return out


def ms_side_deltas(lora: LoraSet) -> dict[str, np.ndarray]:
    """The same, from the MindSpore-side LoRA (fused in_proj split into q/k/v rows)."""
    out = {}
    for p in lora.ordered():
        d = p.delta().reshape(p.module.out_features, -1)
        n = len(p.module.diffusers)
        rows = d.shape[0] // n
        for i, name in enumerate(p.module.diffusers):
            out[name] = d[i * rows:(i + 1) * rows]
    return out


def compare_deltas(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[str]:
    """Problems found: missing/extra modules and modules whose merged delta differs."""
    problems = [f"missing in diffusers: {k}" for k in sorted(set(expected) - set(got))]
    problems += [f"unexpected in diffusers: {k}" for k in sorted(set(got) - set(expected))]
    tol = CONVERSION_DELTA
    for k in sorted(set(expected) & set(got)):
        if not np.allclose(got[k], expected[k], rtol=tol.rtol, atol=tol.atol):
            problems.append(f"delta differs: {k} (max {np.abs(got[k] - expected[k]).max():.3g})")
    return problems


@pytest.fixture(scope="module")
def ms_lora_file(tmp_path_factory, tiny_layout):
    """A trained-looking MindONE LoRA on every LoRA-able module, non-trivial scale (alpha/r = 2)."""
    d = tmp_path_factory.mktemp("ms")
    lora = make_lora(tiny_layout, rank=4, alpha=8.0, modules="all", seed=11)
    return write_ms_lora(d / "ms_lora.ckpt", lora), lora


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_converted_lora_loads_completely_and_deltas_match(tmp_path, tiny_pipeline_dir, ms_lora_file, fmt):
    src, lora = ms_lora_file
    out = tmp_path / f"{fmt}.safetensors"
    convert(ConvertOptions(src=src, dst=out, fmt=fmt, layout="tiny", alpha=8.0))
    pipe = load_into_pipeline(tiny_pipeline_dir, out)
    got = pipeline_deltas(pipe)
    expected = ms_side_deltas(load_lora(src, layout=lora.layout, alpha=8.0))
    assert len(expected) == sum(len(e.diffusers) for e in keymap_for(lora.layout).lora_entries())
    assert compare_deltas(expected, got) == []


def test_unconverted_mindone_file_loads_nothing_and_is_detected(tmp_path, tiny_pipeline_dir, ms_lora_file):
    """The user's original problem: MindONE names passed as-is load nothing."""
    _, lora = ms_lora_file
    from lora_parity.convert.safetensors_io import write_safetensors

    raw = tmp_path / "as_is.safetensors"
    write_safetensors(raw, formats.tensors_for(lora, "ms")[0])
    from lora_parity.backends.diffusers.view import LoraLoadError

    with pytest.raises(LoraLoadError, match="no LoRA weight was injected"):
        load_into_pipeline(tiny_pipeline_dir, raw)


@pytest.mark.parametrize("fault", ["swap_projections", "drop_block", "wrong_scale"])
def test_faulty_conversion_is_caught(tmp_path, tiny_pipeline_dir, ms_lora_file, fault):
    src, lora = ms_lora_file
    truth = load_lora(src, layout=lora.layout, alpha=8.0)
    broken = {"swap_projections": faults.swap_projections, "wrong_scale": faults.wrong_scale,
              "drop_block": lambda x: faults.drop_block(x, "input_blocks.3")}[fault](truth)
    out = tmp_path / "broken.safetensors"
    from lora_parity.convert.safetensors_io import write_safetensors

    write_safetensors(out, *formats.tensors_for(broken, "peft"))
    pipe = load_into_pipeline(tiny_pipeline_dir, out)
    problems = compare_deltas(ms_side_deltas(truth), pipeline_deltas(pipe))
    assert problems, f"fault '{fault}' went unnoticed"
    if fault == "drop_block":
        assert all(p.startswith("missing in diffusers") for p in problems)


def _adapter(model) -> str:
    (name,) = model.peft_config.keys()
    return name


def test_file_saved_by_diffusers_itself_converts_back_bitwise(tmp_path, tiny_pipeline_dir, ms_lora_file):
    """Round trip through diffusers' own writer: our PEFT -> load_lora_weights -> save_lora_weights -> MS."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    src, lora = ms_lora_file
    ours = tmp_path / "ours.safetensors"
    convert(ConvertOptions(src=src, dst=ours, layout="tiny", alpha=8.0))
    pipe = load_into_pipeline(tiny_pipeline_dir, ours)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "saved", weight_name="theirs.safetensors",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=_adapter(pipe.unet)),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name=_adapter(pipe.text_encoder)),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2,
                                                             adapter_name=_adapter(pipe.text_encoder_2)))
    back = tmp_path / "back.ckpt"
    convert(ConvertOptions(src=tmp_path / "saved" / "theirs.safetensors", dst=back, layout="tiny", alpha=8.0))
    original, _, _ = formats.read_tensors(src)
    again, _, _ = formats.read_tensors(back)
    assert set(original) == set(again)
    assert all(original[k].bitwise_equal(again[k]) for k in original)
