"""The layout shows the architecture, and the tests keep it that way.

Data flows file -> reader -> key map -> writer (``lora_parity.convert``, no framework) and
base spec -> backends (one capture at a time, ``sides`` + ``backends``) -> aligner -> report
(``lora_parity.parity``, no model).  A module never imports from a layer above it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lora_parity"
STDLIB = set(sys.stdlib_module_names)

# what each layer may import (besides the standard library): lazy imports inside functions included
ALLOWED = {
    "convert": {"numpy", "lora_parity.convert", "lora_parity.errors", "lora_parity.atomic", "tqdm"},
    "parity": {"numpy", "lora_parity.parity", "lora_parity.convert", "lora_parity.errors", "lora_parity.atomic",
               "matplotlib", "PIL", "skimage"},
}
# the one framework use on the conversion path, and why: reading / writing a torch pickle (.bin/.pt) only
# when the user asks for one by extension, with torch.load(weights_only=True)
EXCEPTIONS = {("convert/formats.py", "torch")}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import (the layout uses absolute ones)")
            out.add(node.module or "")
    return out


def _allowed(name: str, allowed: set[str]) -> bool:
    top = name.split(".")[0]
    return top in STDLIB or any(name == a or name.startswith(a + ".") for a in allowed) or top in {
        a for a in allowed if "." not in a}


@pytest.mark.conversion
@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer):
    bad = []
    for f in sorted((PKG / layer).glob("*.py")):
        rel = f"{layer}/{f.name}"
        for name in sorted(_imports(f)):
            if not _allowed(name, ALLOWED[layer]) and (rel, name.split(".")[0]) not in EXCEPTIONS:
                bad.append(f"{rel}: {name}")
    assert not bad, bad


@pytest.mark.conversion
def test_package_has_no_flat_module_soup():
    """Top level: the CLI and the few modules that orchestrate; everything else lives in its layer."""
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "atomic.py", "cli.py", "compare.py", "demo.py", "device.py",
                   "errors.py", "infer.py", "sampling.py"], top
    assert {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "backends", "bases", "convert", "fixtures", "parity", "sides", "suite"}
    assert {p.name for p in (PKG / "backends").iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        "diffusers", "mindone", "port"}


@pytest.mark.conversion
def test_a_conversion_imports_no_framework(tmp_path):
    """Convert a MindONE .ckpt to PEFT and kohya in a fresh interpreter: neither torch nor mindspore is loaded."""
    code = f"""
import sys
from pathlib import Path
from lora_parity.convert.converter import ConvertOptions, convert
from lora_parity.convert.tiny import tiny_layout
from lora_parity.fixtures.synthetic import make_lora, write_ms_lora
src = Path({str(tmp_path)!r}) / "lora.ckpt"
write_ms_lora(src, make_lora(tiny_layout(), rank=4))
for fmt in ("peft", "kohya"):
    convert(ConvertOptions(src=src, dst=src.with_name(fmt + ".safetensors"), fmt=fmt, layout="tiny"))
loaded = sorted(m for m in ("torch", "mindspore", "diffusers", "transformers") if m in sys.modules)
assert not loaded, loaded
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
