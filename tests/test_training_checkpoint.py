"""A LoRA out of mindone.diffusers' intermediate training checkpoint (``checkpoint-N/pytorch_model.ckpt``).

mindone.diffusers' LoRA trainers (``train_text_to_image_lora_sdxl.py``, ``train_dreambooth_lora*.py``) save
``ms.save_checkpoint(unet, ...)`` of the whole PEFT-wrapped UNet at each checkpoint step: every UNet weight
under its diffusers path, adapted layers as ``<module>.base_layer.weight`` beside
``<module>.lora_A.default.weight`` / ``lora_B``, no alpha (they train with ``lora_alpha = rank``).  A user checks
a run before it ends by extracting the LoRA: it must equal what the trainer's ``save_lora_weights`` writes at
the end, load completely in diffusers, and the summary must say what else the file held.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from lora_parity.convert import ckpt_io, formats
from lora_parity.convert.converter import ConvertOptions, convert
from lora_parity.convert.keymap import keymap_for
from lora_parity.convert.safetensors_io import read_safetensors
from lora_parity.convert.tensor import Tensor
from lora_parity.errors import LoraParityError

from .test_diffusers_load import compare_deltas, load_into_pipeline, pipeline_deltas

RANK = 4
SCRIPT = Path(__file__).parent / "mindone_scripts" / "save_training_checkpoint.py"


def write_wrapped_checkpoint(path: Path, layout, adapters=("default",)) -> dict[str, np.ndarray]:
    """A PEFT-wrapped UNet's checkpoint as MindSpore saves it (names as mindone 0.5 gives them); returns
    the expected deltas (alpha = rank) by diffusers name."""
    rng = np.random.default_rng(4)
    tensors, deltas = {}, {}
    tensors["conv_in.weight"] = Tensor.from_numpy(rng.standard_normal((8, 4, 3, 3), dtype=np.float32))
    for e in keymap_for(layout).attention_entries():
        mod = e.diffusers[0].removeprefix("unet.")
        tensors[f"{mod}.base_layer.weight"] = Tensor.from_numpy(
            rng.standard_normal((e.out_features, e.in_features), dtype=np.float32))
        for name in adapters:
            a = rng.standard_normal((RANK, e.in_features), dtype=np.float32)
            b = rng.standard_normal((e.out_features, RANK), dtype=np.float32) * np.float32(0.05)
            tensors[f"{mod}.lora_A.{name}.weight"] = Tensor.from_numpy(a)
            tensors[f"{mod}.lora_B.{name}.weight"] = Tensor.from_numpy(b)
            deltas[e.diffusers[0]] = b.astype(np.float64) @ a.astype(np.float64)
    ckpt_io.write_ckpt(path, tensors)
    return deltas


@pytest.mark.conversion
def test_lora_extracted_from_a_training_checkpoint_loads_completely(tmp_path, tiny_layout, tiny_pipeline_dir):
    step = tmp_path / "checkpoint-100"
    step.mkdir()
    src = step / "pytorch_model.ckpt"
    deltas = write_wrapped_checkpoint(src, tiny_layout)
    report = convert(ConvertOptions(src=src, layout="tiny"))  # default: PEFT beside it (MindSpore-side file)
    assert report.dst == step / "pytorch_model_pt.safetensors" and report.dst_format == "peft"
    n_base = len(ckpt_io.read_ckpt(src)) - 2 * len(deltas)
    assert report.ignored_counts() == {formats.IGNORED_BASE: n_base}
    assert any(f"adapter 'default'" in note and f"{n_base} UNet weights" in note for note in report.notes)
    assert compare_deltas(deltas, pipeline_deltas(load_into_pipeline(tiny_pipeline_dir, report.dst))) == []


@pytest.mark.conversion
def test_extraction_that_misses_a_module_kind_is_caught(tmp_path, tiny_layout, tiny_pipeline_dir, monkeypatch):
    """A module-name pattern that stops at a digit segment (``to_out.0``): the deltas check names the
    modules that did not arrive; the converter itself refuses the LoRA keys it cannot place (strict)."""
    import re

    src = tmp_path / "pytorch_model.ckpt"
    deltas = write_wrapped_checkpoint(src, tiny_layout)
    monkeypatch.setattr(formats, "_WRAPPED_RE", re.compile(  # module names assumed to end in a letter
        r"^(?P<mod>(?:down_blocks|mid_block|up_blocks).*?[a-z_])\.lora_(?P<half>[AB])\.(?P<adapter>\w+)\.weight$"))
    with pytest.raises(LoraParityError, match="do not map"):
        convert(ConvertOptions(src=src, dst=tmp_path / "strict.safetensors", layout="tiny"))
    out = tmp_path / "lenient.safetensors"
    convert(ConvertOptions(src=src, dst=out, layout="tiny", strict=False))
    problems = compare_deltas(deltas, pipeline_deltas(load_into_pipeline(tiny_pipeline_dir, out)))
    assert problems and any("to_out.0" in p for p in problems), problems


@pytest.mark.conversion
def test_training_checkpoint_with_two_adapters_is_refused(tmp_path, tiny_layout, capsys):
    from lora_parity.cli import main

    src = tmp_path / "pytorch_model.ckpt"
    write_wrapped_checkpoint(src, tiny_layout, adapters=("default", "style"))
    rc = main(["convert", str(src), "--layout", "tiny"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "2 adapters (default, style)" in err and str(src) in err
    assert list(tmp_path.iterdir()) == [src]


@pytest.mark.parity
def test_mindone_training_checkpoint_gives_the_trainers_own_lora(tmp_path, tiny_pipeline_dir):
    """mindone itself: add_adapter + save_checkpoint(unet) at step N, save_lora_weights at the end; the LoRA
    extracted from the step-N file equals the final file, tensor for tensor."""
    from lora_parity.backends import get_backend

    backend = get_backend("mindone")
    ok, why = backend.is_available()
    if not ok:
        pytest.skip(f"mindone backend: {why}")
    proc = subprocess.run([backend.interpreter(), str(SCRIPT), str(tiny_pipeline_dir / "unet" / "config.json"),
                           str(tmp_path), str(RANK)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "extracted.safetensors"
    convert(ConvertOptions(src=tmp_path / "checkpoint-100" / "pytorch_model.ckpt", dst=out,
                           layout=str(tiny_pipeline_dir)))
    ours, _ = read_safetensors(out)
    theirs, _ = read_safetensors(tmp_path / "pytorch_lora_weights.safetensors")
    assert set(ours) == set(theirs) and all(ours[k].bitwise_equal(theirs[k]) for k in ours)
    pipe = load_into_pipeline(tiny_pipeline_dir, out)
    assert len(pipeline_deltas(pipe)) == len(ours) // 2
