"""What every backend (PyTorch, MindSpore) offers, with numpy at the boundary.

A backend wraps one framework's SDXL pipeline and hands out inputs and
intermediate activations as numpy arrays, so the comparison code never imports
torch or mindspore.  Activation names are the backend's own module names
(``unet.down_blocks.1.attentions.0`` for diffusers); aligning the two naming
schemes is the key map's job, not the backend's.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


@dataclass(frozen=True)
class ParityInputs:
    """One set of inputs that both backends are fed.

    Give either ``prompt`` (each backend tokenizes it) or the token ids of both
    tokenizers (``(1, 77)`` integer arrays), which takes tokenizers out of the
    comparison.  ``timesteps`` are UNet timesteps as the scheduler hands them out.
    """

    latents: np.ndarray
    timesteps: tuple[float, ...] = (999.0,)
    prompt: str | None = None
    input_ids: np.ndarray | None = None
    input_ids_2: np.ndarray | None = None
    original_size: tuple[int, int] = (32, 32)
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] = (32, 32)
    guidance: float | None = None

    def __post_init__(self) -> None:
        has_ids = self.input_ids is not None and self.input_ids_2 is not None
        if self.prompt is None and not has_ids:
            raise ValueError("ParityInputs needs a prompt or token ids for both tokenizers")
        if (self.input_ids is None) != (self.input_ids_2 is None):
            raise ValueError("ParityInputs needs token ids for both tokenizers, or neither")
        if np.asarray(self.latents).ndim != 4:
            raise ValueError(f"latents must be (B, C, H, W), got shape {np.shape(self.latents)}")
        object.__setattr__(self, "timesteps", tuple(float(t) for t in np.atleast_1d(self.timesteps)))


@dataclass
class Activations:
    """Ordered ``name -> array`` (float32/float64) with a component tag per name."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: np.ndarray, component: str) -> None:
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        if name in self.values:
            raise ValueError(f"activation {name!r} recorded twice")
        self.values[name] = np.asarray(value)
        self.components[name] = component

    def update(self, other: Activations) -> Activations:
        for name, value in other.values.items():
            self.add(name, value, other.components[name])
        return self

    def select(self, component: str) -> Activations:
        """The activations of one component, order kept."""
        out = Activations()
        for name, value in self.values.items():
            if self.components[name] == component:
                out.add(name, value, component)
        return out

    def names(self) -> list[str]:
        return list(self.values)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.values.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


@runtime_checkable
class PipelineView(Protocol):
    """A framework's SDXL pipeline seen through numpy (in-process; the tests' view of one backend).

    ``compare`` itself goes through :class:`lora_parity.backends.registry.Backend`, whose
    captures run in their own processes.

    Array arguments are numpy (a backend may also accept its own tensors);
    results are numpy.  ``prompt_embeds`` is ``(B, 77, ctx)``, ``pooled``
    ``(B, proj)``, ``add_time_ids`` ``(B, 6)``.
    """

    name: str

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)``, e.g. ``(False, "mindspore is not installed")``."""
        ...

    def tokenize(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``(1, 77)`` of both tokenizers."""
        ...

    def encode_prompt(
        self, prompt: str | None = None, *, input_ids: np.ndarray | None = None,
        input_ids_2: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(prompt_embeds, pooled_prompt_embeds)`` as the SDXL pipeline computes them."""
        ...

    def text_encoder_activations(
        self, prompt: str | None = None, *, input_ids: np.ndarray | None = None,
        input_ids_2: np.ndarray | None = None,
    ) -> Activations:
        """Hidden states of every layer and the pooled / projected output of both text encoders."""
        ...

    def add_time_ids(
        self, original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
        target_size: tuple[int, int],
    ) -> np.ndarray:
        ...

    def unet_activations(
        self, latents: np.ndarray, timestep: float, prompt_embeds: np.ndarray,
        pooled: np.ndarray, add_time_ids: np.ndarray,
    ) -> Activations:
        ...

    def vae_decode_activations(self, latents: np.ndarray) -> Activations:
        """Decoder activations for ``latents`` (divided by the scaling factor first, as the pipeline does)."""
        ...

    def generate(self, prompt: str, latents: np.ndarray, steps: int, guidance: float) -> np.ndarray:
        """The pipeline's image for these start latents, ``uint8`` ``(H, W, 3)``."""
        ...
