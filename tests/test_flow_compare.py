"""SD3 through ``compare``: mindone.diffusers against diffusers (issue 15, the transformer families).

The LoRA is what mindone.diffusers' SD3 trainer saves (``add_adapter`` on the transformer with its default
targets, ``StableDiffusion3Pipeline.save_lora_weights``, run in the mindone environment); the base is
generated (``random:tiny-sd3``: CLIP-L, CLIP-G, T5, MMDiT, FlowMatch Euler).  A clean run passes (every
text encoder, the conditioning, the transformer per denoising step, the VAE, a 2-step image); q/k swapped
in one joint block on the PyTorch side fails with exit 1 naming that block; the port refuses the base.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors

from .helpers import run_cli

pytestmark = pytest.mark.parity
SCRIPT = Path(__file__).parent / "mindone_scripts" / "save_trained_sd3_lora.py"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(base spec, cache, pipeline folder, the LoRA mindone's SD3 trainer code saved)."""
    from lora_parity.backends import get_backend
    from lora_parity.bases import resolve_base

    be = get_backend("mindone")
    ok, why = be.is_available()
    if not ok:
        pytest.skip(f"mindone backend: {why}")
    root = tmp_path_factory.mktemp("sd3")
    spec, cache = "random:tiny-sd3", root / "cache"
    base = resolve_base(spec, cache=cache)
    proc = subprocess.run([be.interpreter(), str(SCRIPT), str(base.pipeline_dir), str(root / "lora"), "4",
                           base.variant or ""], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return spec, cache, base.pipeline_dir, root / "lora" / "pytorch_lora_weights.safetensors"


def _compare(sd3, tmp_path, *extra, backend="mindone"):
    spec, cache, _, lora = sd3
    report = tmp_path / "report"
    code, out, err = run_cli(["compare", "--ms-backend", backend, "--base", spec, "--cache", str(cache),
                              "--ms-lora", str(lora), "--report", str(report), "--quiet", *extra])
    data = json.loads((report / "report.json").read_text()) if (report / "report.json").is_file() else None
    return code, out + err, data


def test_mindone_trained_sd3_lora_passes(sd3, tmp_path):
    code, text, report = _compare(sd3, tmp_path, "--steps", "2")
    assert code == 0, text[-3000:]
    comps = {r["component"] for r in report["layers"]}
    assert {"text_encoder", "text_encoder_2", "text_encoder_3", "conditioning", "transformer", "vae"} <= comps
    steps = {r["diffusers"].partition("#")[2] for r in report["layers"] if r["component"] == "transformer"}
    assert steps == {"", "1"}  # both denoising steps compared
    assert report["image"]["passed"]


def test_qk_swap_in_one_joint_block_fails_naming_it(sd3, tmp_path):
    _, _, _, lora = sd3
    tensors, meta = read_safetensors(lora)
    block = "transformer.transformer_blocks.1.attn."
    bad = dict(tensors)
    for half in ("lora_A", "lora_B"):
        q, k = f"{block}to_q.{half}.weight", f"{block}to_k.{half}.weight"
        bad[q], bad[k] = tensors[k], tensors[q]
    path = tmp_path / "pt_side.safetensors"
    write_safetensors(path, bad, meta)
    code, text, report = _compare(sd3, tmp_path, "--pt-lora", str(path))
    assert code == 1, text[-3000:]
    first = report["first_diverging_layer"]
    assert first["diffusers"].startswith("transformer.transformer_blocks.1"), first
    assert "transformer_blocks.1" in text


def test_the_port_refuses_an_sd3_base_in_one_line(sd3, tmp_path):
    code, text, _ = _compare(sd3, tmp_path, backend="port")
    assert code == 2 and "sd3" in text and "Traceback" not in text, text[-2000:]
