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
from lora_parity.convert.layout import tiny_layout
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


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, lazy imports included.  ``from pkg import sub`` counts as an
    import of ``pkg.sub`` when that is a module; a submodule's implicit import of its own package is not an
    edge (Python runs ``pkg/__init__`` first whatever the submodule does)."""
    files = {_module_name(f): f for f in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            for t in targets:
                if t in files and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


@pytest.mark.conversion
def test_no_module_reaches_back_up_through_an_import_cycle():
    """What two modules both need lives a floor below them (e.g. ``sides.inputs``, ``sides.quiet``,
    ``convert.tiny`` as plain data), so no import chain, lazy ones included, comes back to where it began."""
    assert import_cycles(import_graph()) == []


@pytest.mark.conversion
def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["lora_parity.convert.tiny"].add("lora_parity.convert.layout")  # the circle this repository had
    assert ["lora_parity.convert.layout", "lora_parity.convert.tiny"] in import_cycles(graph)
