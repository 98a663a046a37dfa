"""The one ``Backend`` protocol ``compare`` uses, and the three backends behind it.

A backend is what runs one side of a comparison: it says whether it can run here and in
which interpreter, which dtypes it supports on a device, how it names its activations (SGM
block names or diffusers module names: the aligner needs to know), what LoRA file it loads,
and it captures a :class:`~lora_parity.sides.request.SideRequest` into a
:class:`~lora_parity.sides.request.SideResult`.  ``compare`` never imports a framework: it
asks the registry and runs the capture in the backend's interpreter.

Why a backend may have its own interpreter: mindone 0.5.0 pins ``transformers==4.57.1``
(its import fails with transformers 5), which needs ``huggingface-hub<1.0``, while diffusers
0.42 needs ``huggingface-hub>=1.32``: one environment cannot hold both.  ``make setup`` builds
``.venv`` (diffusers, the port) and ``.venv-mindone`` (mindone); ``--ms-python`` or
``$LORA_PARITY_MINDONE_PYTHON`` point elsewhere.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from lora_parity.sides.request import SideRequest, SideResult

MINDONE_PYTHON_ENV = "LORA_PARITY_MINDONE_PYTHON"
MINDONE_VENV = ".venv-mindone"
# MindSpore 2.10's CPU MatMul has no bfloat16 kernel ("Select CPU operator[MatMul] fail")
MS_CPU_DTYPES = ("F32", "F16")


@runtime_checkable
class Backend(Protocol):
    name: str  # "diffusers" | "port" | "mindone"
    side: str  # "pt" (the reference) | "ms" (the MindSpore implementation judged)
    naming: str  # activation names: "diffusers" module names or "sgm" block names
    lora_format: str  # what LoRA file its capture loads: "peft" (safetensors) or "mindone-ckpt"

    def interpreter(self, override: str | None = None) -> str:
        """The Python that runs this backend's capture."""
        ...

    def is_available(self, python: str | None = None) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)`` naming what is missing."""
        ...

    def supports(self, dtype: str, device: str) -> tuple[bool, str]:
        ...

    def capture(self, req: "SideRequest") -> "SideResult":
        """Run ``req`` in this process (the child that :func:`lora_parity.sides.run.run_side` starts)."""
        ...

    def preload(self) -> None:
        """Import what :meth:`capture` needs and run nothing: the warm server each side is forked from
        (:mod:`lora_parity.sides.forkserver`) calls it once."""
        ...


def _import_all(modules: tuple[str, ...], attributes: dict[str, tuple[str, ...]] = {}) -> None:  # noqa: B006
    """Import ``modules`` and touch ``attributes`` of lazily loading packages (diffusers' pipelines)."""
    import importlib

    for name in modules:
        importlib.import_module(name)
    for name, attrs in attributes.items():
        mod = importlib.import_module(name)
        for attr in attrs:
            getattr(mod, attr)


#: the pipelines and models a capture may build (diffusers and mindone.diffusers load them lazily)
_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionPipeline",
              "StableDiffusion3Pipeline", "FluxPipeline", "UNet2DConditionModel", "AutoencoderKL",
              "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")
_TEXT_MODELS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "CLIPTokenizer")


def _has_modules(python: str, modules: tuple[str, ...]) -> tuple[bool, str]:
    """Whether ``python`` can import ``modules`` (found, not imported: cheap)."""
    if python == sys.executable:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        return (not missing, f"{', '.join(missing)} not installed in {python}" if missing else "")
    return _has_modules_elsewhere(python, modules)


@functools.lru_cache(maxsize=None)
def _has_modules_elsewhere(python: str, modules: tuple[str, ...]) -> tuple[bool, str]:
    if not Path(python).is_file():
        return False, f"no interpreter at {python}"
    code = ("import importlib.util, sys; m = [n for n in sys.argv[1:] if importlib.util.find_spec(n) is None]; "
            "print(','.join(m)); sys.exit(1 if m else 0)")
    proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True)
    if proc.returncode:
        return False, f"{proc.stdout.strip() or 'python'} not installed in {python}"
    return True, ""


def _ms_supports(dtype: str, device: str) -> tuple[bool, str]:
    if device == "CPU" and dtype not in MS_CPU_DTYPES:
        return False, f"MindSpore on CPU has no {dtype} MatMul kernel (run it with --ms-device Ascend)"
    return True, ""


@dataclass(frozen=True)
class DiffusersBackend:
    """PyTorch: diffusers' own SDXL pipeline and ``load_lora_weights`` (:mod:`lora_parity.backends.diffusers.capture`)."""

    name: str = "diffusers"
    side: str = "pt"
    naming: str = "diffusers"
    lora_format: str = "peft"

    def interpreter(self, override: str | None = None) -> str:
        return override or sys.executable

    def is_available(self, python: str | None = None) -> tuple[bool, str]:
        return _has_modules(self.interpreter(python), ("torch", "diffusers", "transformers"))

    def supports(self, dtype: str, device: str) -> tuple[bool, str]:
        return (True, "") if dtype in ("F32", "F16", "BF16") else (False, f"unknown dtype {dtype}")

    def capture(self, req):
        from lora_parity.backends.diffusers.capture import capture_pt
        from lora_parity.sides.quiet import quiet_frameworks

        quiet_frameworks()  # before diffusers is imported
        return capture_pt(req)

    def preload(self) -> None:
        from lora_parity.sides.quiet import quiet_frameworks

        quiet_frameworks()
        _import_all(("torch", "peft", "lora_parity.backends.diffusers.capture", "lora_parity.backends.flow",
                     "lora_parity.backends.replay"),
                    {"diffusers": _PIPELINES, "transformers": _TEXT_MODELS})


@dataclass(frozen=True)
class PortBackend:
    """This project's SGM-layout SDXL in MindSpore ops, MindONE's ``.ckpt`` LoRA (:mod:`lora_parity.backends.port.capture`)."""

    name: str = "port"
    side: str = "ms"
    naming: str = "sgm"
    lora_format: str = "mindone-ckpt"

    def interpreter(self, override: str | None = None) -> str:
        return override or sys.executable

    def is_available(self, python: str | None = None) -> tuple[bool, str]:
        return _has_modules(self.interpreter(python), ("mindspore",))

    def supports(self, dtype: str, device: str) -> tuple[bool, str]:
        return _ms_supports(dtype, device)

    def capture(self, req):
        from lora_parity.backends.port.capture import capture_ms

        return capture_ms(req)

    def preload(self) -> None:
        from lora_parity.sides.quiet import quiet_environment

        quiet_environment()
        _import_all(("mindspore", "lora_parity.backends.port.capture", "lora_parity.backends.replay"),
                    {"transformers": ("CLIPTokenizer",)})


@dataclass(frozen=True)
class MindoneBackend:
    """mindone.diffusers' own SDXL pipeline and LoRA loader (:mod:`lora_parity.backends.mindone.capture`)."""

    name: str = "mindone"
    side: str = "ms"
    naming: str = "diffusers"
    lora_format: str = "peft"

    def interpreter(self, override: str | None = None) -> str:
        """``override``, else ``$LORA_PARITY_MINDONE_PYTHON``, else the checkout's ``.venv-mindone``,
        else this interpreter."""
        if override:
            return override
        if os.environ.get(MINDONE_PYTHON_ENV):
            return os.environ[MINDONE_PYTHON_ENV]
        venv = Path(__file__).resolve().parents[2] / MINDONE_VENV / "bin" / "python"
        if venv.is_file() and importlib.util.find_spec("mindone") is None:
            return str(venv)
        return sys.executable

    def is_available(self, python: str | None = None) -> tuple[bool, str]:
        ok, why = _has_modules(self.interpreter(python), ("mindspore", "mindone"))
        if not ok:
            why += f" (make setup builds {MINDONE_VENV}; or give --ms-python / ${MINDONE_PYTHON_ENV})"
        return ok, why

    def supports(self, dtype: str, device: str) -> tuple[bool, str]:
        return _ms_supports(dtype, device)

    def capture(self, req):
        from lora_parity.backends.mindone.capture import capture_mindone

        return capture_mindone(req)

    def preload(self) -> None:
        from lora_parity.backends.mindone.capture import _quiet_imports
        from lora_parity.sides.quiet import quiet_environment

        quiet_environment()
        _quiet_imports()
        _import_all(("mindspore", "lora_parity.backends.mindone.compat", "lora_parity.backends.flow",
                     "lora_parity.backends.replay"),
                    {"mindone.diffusers": _PIPELINES, "mindone.transformers": _TEXT_MODELS[:3],
                     "transformers": ("CLIPTokenizer",)})


BACKENDS: dict[str, Backend] = {b.name: b for b in (DiffusersBackend(), PortBackend(), MindoneBackend())}
MS_BACKENDS = tuple(n for n, b in BACKENDS.items() if b.side == "ms")  # ("port", "mindone")


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None
