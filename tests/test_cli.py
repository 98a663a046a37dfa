"""CLI surface: --help everywhere, `keys` table, default output names, python -m."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lora_parity.cli import build_parser
from lora_parity.convert.layout import PRESETS
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora
from lora_parity.convert.layout import tiny_layout
from lora_parity.convert.safetensors_io import read_safetensors

from .helpers import run_cli

pytestmark = pytest.mark.conversion


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command):
    code, out, _ = run_cli([command, "--help"])
    assert code == 0 and "usage:" in out and command in out


def test_keys_prints_source_target_shape(tmp_path):
    src = write_ms_lora(tmp_path / "l.ckpt", make_lora(PRESETS["sdxl-base"], rank=4))
    code, out, err = run_cli(["keys", str(src)])
    assert code == 0, err
    rows = out.strip().splitlines()
    assert len(rows) == 1120
    first = rows[0].split()
    assert first[0].startswith("model.diffusion_model.") and first[1].startswith("unet.")
    assert any(r.split()[0] == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight"
               and r.split()[1] == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
               and r.split()[2] == "4x640" for r in rows)


def test_keys_fused_in_proj_fans_out_to_qkv(tmp_path):
    name = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj"
    src = write_ms_lora(tmp_path / "te.ckpt", make_lora(tiny_layout(), rank=2, modules=[name]))
    code, out, err = run_cli(["keys", str(src), "--layout", "tiny", "--format", "kohya"])
    assert code == 0, err
    targets = [r.split()[1] for r in out.strip().splitlines()]
    assert [t for t in targets if t.endswith("lora_up.weight")] == [
        f"lora_te2_text_model_encoder_layers_1_self_attn_{p}_proj.lora_up.weight" for p in "qkv"]


def test_default_output_beside_source_and_direction(tmp_path):
    src = write_ms_lora(tmp_path / "my_lora.ckpt", make_lora(PRESETS["sdxl-base"], rank=4))
    code, out, err = run_cli(["convert", str(src)])
    assert code == 0, err
    assert (tmp_path / "my_lora_pt.safetensors").is_file()
    code, out, err = run_cli(["convert", str(tmp_path / "my_lora_pt.safetensors")])
    assert code == 0, err
    assert (tmp_path / "my_lora_pt_ms.ckpt").is_file() or (tmp_path / "my_lora_ms.ckpt").is_file()


def test_python_dash_m_runs(tmp_path):
    """The module entry point in a real process: exit 0 and a complete file.  Written as safetensors, so the
    process imports no framework (tests/test_bad_input.py runs one that fails)."""
    src = write_ms_lora(tmp_path / "l.ckpt", make_lora(PRESETS["sdxl-base"], rank=4))
    out = tmp_path / "l.safetensors"
    proc = subprocess.run([sys.executable, "-m", "lora_parity", "convert", str(src), "-o", str(out), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tensors, _ = read_safetensors(out)
    assert len(tensors) == 1120 and all(k.startswith("unet.") for k in tensors)


def test_pickle_output_only_by_extension(tmp_path):
    src = write_ms_lora(tmp_path / "l.ckpt", make_lora(PRESETS["sdxl-base"], rank=4))
    code, _, err = run_cli(["convert", str(src), "-o", str(tmp_path / "l.bin"), "-q"])
    assert code == 0, err
    import torch

    sd = torch.load(tmp_path / "l.bin", weights_only=True)
    assert len(sd) == 1120 and all(k.startswith("unet.") for k in sd)
