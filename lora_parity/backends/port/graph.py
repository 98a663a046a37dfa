"""Optional graph-mode execution of the SDXL cells (PyNative stays the default).

MindSpore compiles a cell's ``construct`` into one graph in ``GRAPH_MODE``; on a small
CPU box the tiny UNet forward (batch 2) then costs ~0.027 s instead of ~0.11 s in PyNative
(one graph launch instead of ~650 Python-dispatched ops; diffusers: ~0.017 s), with
bit-identical outputs: the same kernels run in the same order.  The first call compiles
(~6 s for the tiny UNet, ~1 s per tiny text encoder, ~4 s for the tiny VAE decoder).

Use::

    comps = build_sdxl(layout, graph=True)      # every component, or
    compile_for_graph(unet)                     # one cell (returns it)
    out = unet(x, t, context, y)                # runs as a graph
    with capture_activations(unet) as acts:     # recording needs .asnumpy() per block:
        unet(x, t, context, y)                  # ... so it always runs PyNative
    compile_for_graph(unet, False)              # back to PyNative

How it works, and why not ``mindspore.jit``: in MindSpore 2.10 a ``jit``-wrapped method
called from PyNative freezes the parameter values it saw when it compiled (a later
``set_data`` / ``load_param_into_net`` / :func:`~.lora.merge_lora` is ignored).  Cells
called in ``GRAPH_MODE`` read their parameters live, so :func:`run_graph` switches the
process-wide mode to ``GRAPH_MODE`` for the one call and back to ``PYNATIVE_MODE``
(not thread-safe: do not run other MindSpore code concurrently from another thread).

A compiled graph also freezes every non-tensor attribute its ``construct`` read (LoRA
injected or merged, ``lora_scale``, ``Conv2d.impl``, parameter dtypes...).  Each call
therefore computes :func:`structure_key` -- a digest of the cell tree, its plain
attributes and its parameters' shapes and dtypes -- and compiles under a ``phase``
named after it: a changed structure compiles a new graph, a structure seen before
reuses its graph.  Only outputs come back (no activations, see above).

``construct`` code of these cells must stay parseable by MindSpore's graph compiler:
``construct(self, ...)`` (the parser looks for ``self``), at most one ``for`` per
comprehension, no ``list.pop``, sub-cells iterated from a ``CellList`` or a plain list
attribute (``EmbedSequential.cell_list``), numpy only on compile-time constants.
``tests/test_ms_graph_mode.py`` compiles every component.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn

GRAPH_PHASE_PREFIX = "predict.lora_parity."

# attributes every Cell has, or MindSpore sets while compiling: not part of the structure
_CELL_ATTRS = frozenset(vars(nn.Cell())) | {
    "arguments_key", "compile_phase", "current_phase", "sequence_modified", "phase",
    "recorder", "replay", "use_graph", "cell_list", "enable_tuple_broaden"}
_PLAIN = (bool, int, float, str, type(None))


def structure_key(cell: nn.Cell) -> str:
    """Digest of everything a compiled graph of ``cell`` takes as constant (not parameter values).

    Child cell paths and types, every public attribute of a plain type (bool, int, float,
    str, None; e.g. ``lora_merged``, ``lora_scale``, ``impl``, ``eps``) and every
    parameter's name, shape and dtype.  About 2 ms for the tiny UNet (354 cells); stable
    within a process (it is a Python ``hash``), which is all a phase name needs.
    """
    parts = []
    for path, c in cell.cells_and_names():
        d = vars(c)
        attrs = tuple(sorted((k, d[k]) for k in d.keys() - _CELL_ATTRS
                             if k[0] != "_" and isinstance(d[k], _PLAIN)))
        params = tuple((p.name, tuple(p.shape), p.dtype) for p in c._params.values() if p is not None)
        parts.append((path, type(c), attrs, params))
    return format(hash(tuple(parts)) & 0xFFFF_FFFF_FFFF_FFFF, "016x")


@contextlib.contextmanager
def graph_mode() -> Iterator[None]:
    """Run the body in ``GRAPH_MODE``; restores the previous mode (PyNative by default) after."""
    old = ms.get_context("mode")
    if old == ms.GRAPH_MODE:
        yield
        return
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=old)


def _as_graph_arg(value):
    # arrays and floats (e.g. a timestep) become tensors, i.e. graph inputs: as Python constants
    # every new value would compile a new graph.  bool / int / None stay constants (flags).
    if isinstance(value, np.ndarray):
        return Tensor(value)
    if isinstance(value, (float, np.floating)):
        return Tensor(np.float32(value))
    return value


def run_graph(cell: nn.Cell, *args, **kwargs):
    """Call ``cell`` once as a compiled graph (compiling it first for a new structure or new
    input shapes/dtypes); the caller's PyNative mode and the cell's ``phase`` are restored."""
    args = tuple(_as_graph_arg(a) for a in args)
    kwargs = {k: _as_graph_arg(v) for k, v in kwargs.items()}
    old_phase = cell.phase
    cell.phase = GRAPH_PHASE_PREFIX + structure_key(cell)
    try:
        with graph_mode():
            return nn.Cell.__call__(cell, *args, **kwargs)
    finally:
        cell.phase = old_phase


def compile_for_graph(cell: nn.Cell, enabled: bool = True) -> nn.Cell:
    """Make calls of ``cell`` (a :class:`~.layers.Recordable`: UNet, text encoder, VAE) run as a
    graph (``enabled=False``: PyNative again).  Returns ``cell``.

    Compilation happens lazily on the first call (and again when the structure or the input
    shapes change).  While :func:`~.layers.capture_activations` records the cell, calls run
    PyNative.  Other cells: call :func:`run_graph` directly.
    """
    if not hasattr(cell, "use_graph"):
        raise TypeError(f"{type(cell).__name__} is not a Recordable cell; call run_graph(cell, ...) instead")
    cell.use_graph = bool(enabled)
    return cell


def uses_graph(cell: nn.Cell) -> bool:
    """Whether calls of ``cell`` run as a compiled graph (see :func:`compile_for_graph`)."""
    return bool(getattr(cell, "use_graph", False))
