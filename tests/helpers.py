"""Shared test helpers: meta-device reference models and small utilities (no assertions of their own)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
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


#: a conftest registering this project's plugin, as the repository's conftest.py does without the entry point
PLUGIN_CONFTEST = """
def pytest_addhooks(pluginmanager):
    from lora_parity.suite import plugin

    if not pluginmanager.is_registered(plugin) and not pluginmanager.is_blocked(plugin.NAME):
        pluginmanager.register(plugin, plugin.NAME)
"""


def start_plugin_run(folder: Path, files: dict[str, str], ini: str = "", env: dict | None = None,
                     args: tuple[str, ...] = ()) -> subprocess.Popen:
    """pytest on ``files`` in ``folder`` with this project's plugin and no other (third-party plugins are not
    loaded: ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``, the run then costs a bare interpreter's start-up), started;
    ``ini`` is the body of its ``[pytest]`` section.  Output (stdout and stderr) is piped."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in {**files, "conftest.py": PLUGIN_CONFTEST}.items():
        (folder / name).write_text(text)
    (folder / "pytest.ini").write_text("[pytest]\n" + ini)
    env = {**(os.environ if env is None else env), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(folder)],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
