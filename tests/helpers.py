"""Shared test helpers: meta-device reference models and small utilities (no assertions of their own)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path


def meta_unet(config: dict):
    """diffusers' UNet built on the meta device: real module tree, no memory (one per config and process)."""
    from lora_parity.bases.configs import meta_model

    return meta_model("unet", config)


def meta_text_encoder(config: dict, *, projection: bool):
    """transformers' CLIP text model (with projection: SDXL's second encoder) on the meta device."""
    from lora_parity.bases.configs import meta_model

    return meta_model("text_encoder_2" if projection else "text_encoder", config)


def torch_modules(model, prefix: str, kinds=("Linear", "Conv2d", "GroupNorm", "LayerNorm")) -> dict:
    """name -> module for every Linear/Conv/Norm, names prefixed like our diffusers names."""
    return {prefix + n: m for n, m in model.named_modules() if type(m).__name__ in kinds}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from lora_parity.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes under ``folder`` (to prove inputs are never modified)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
