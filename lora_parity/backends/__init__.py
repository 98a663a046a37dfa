"""Framework backends behind one numpy-facing protocol.

``base`` has no framework imports.  Import a backend module only when it is
needed (``lora_parity.backends.torch_backend``), or use :func:`get_backend`.
"""
from __future__ import annotations

from .base import COMPONENTS, Activations, Backend, ParityInputs

_BACKENDS = {
    "torch": ("lora_parity.backends.torch_backend", "TorchBackend"),
    "mindspore": ("lora_parity.backends.mindspore_backend", "MindSporeBackend"),
}


def get_backend(name: str) -> type:
    """The backend class registered under ``name`` (imports it lazily)."""
    import importlib

    try:
        module, cls = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(_BACKENDS))}") from None
    return getattr(importlib.import_module(module), cls)


__all__ = ["COMPONENTS", "Activations", "Backend", "ParityInputs", "get_backend"]
