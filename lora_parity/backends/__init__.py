"""The backends: three SDXL implementations behind one :class:`Backend` protocol.

``diffusers`` (PyTorch), ``port`` (this project's SGM-layout SDXL in MindSpore, standing in
for MindONE's ``gm`` code) and ``mindone`` (mindone.diffusers).  ``compare`` gets each side's
capture through :func:`get_backend` (:mod:`.registry`); the captures themselves live in
:mod:`lora_parity.sides`.  ``base`` has no framework imports; framework modules are imported
only when a backend runs.  :func:`get_view` gives the in-process numpy views the tests use.
"""
from __future__ import annotations

from lora_parity.backends.base import COMPONENTS, Activations, ParityInputs, PipelineView
from lora_parity.backends.registry import BACKENDS, MS_BACKENDS, Backend, get_backend

_VIEWS = {
    "torch": ("lora_parity.backends.diffusers.view", "TorchBackend"),
    "mindspore": ("lora_parity.backends.port.view", "MindSporeBackend"),
}


def get_view(name: str) -> type:
    """The in-process pipeline view registered under ``name`` (imports it lazily)."""
    import importlib

    try:
        module, cls = _VIEWS[name]
    except KeyError:
        raise ValueError(f"unknown view {name!r}; known: {', '.join(sorted(_VIEWS))}") from None
    return getattr(importlib.import_module(module), cls)


__all__ = ["BACKENDS", "COMPONENTS", "MS_BACKENDS", "Activations", "Backend", "ParityInputs", "PipelineView",
           "get_backend", "get_view"]
