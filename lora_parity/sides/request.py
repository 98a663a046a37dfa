"""The exact inputs of one side's capture, and what it hands back; both serialisable.

Requests and results cross a process boundary as a folder: ``request.json`` /
``result.json`` (numbers, names, settings) and ``arrays.safetensors`` (latents, token ids,
activations, images).  No pickle anywhere: a result folder can be read back safely.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lora_parity.convert.safetensors_io import read_safetensors, write_safetensors
from lora_parity.convert.tensor import Tensor

REQUEST_JSON = "request.json"
RESULT_JSON = "result.json"
ARRAYS = "arrays.safetensors"
REF = "ref/"  # request arrays: the reference's outputs of the aligned blocks, for replay


@dataclass
class SideRequest:
    """Everything one side needs; arrays live in ``arrays`` (written beside the JSON)."""

    side: str  # "pt" (the reference) | "ms" (the MindSpore implementation judged)
    pipeline_dir: str  # diffusers folder: configs, tokenizers, scheduler (and the PyTorch weights)
    variant: str | None = None  # diffusers weight variant of pipeline_dir ("fp16") or None
    base_spec: str | None = None  # --base SPEC (MindSpore weights from it) ...
    ms_ckpt: str | None = None  # ... or an explicit MindSpore base .ckpt (SGM names)
    cache: str | None = None
    lora: str | None = None  # pt: a PyTorch LoRA file; ms: a MindONE .ckpt
    alpha: float | None = None
    lora_scale: float | None = None  # the port on a MindONE SD 1.x / 2.x .ckpt: its --lora_scale (not in the file)
    ema: bool | None = None  # MindONE file with both sets: the "ema." copies (True) or the trained ones (False)
    prompt: str = ""
    timesteps: list[float] = field(default_factory=lambda: [500.0])
    size_cond: list = field(default_factory=list)  # [[oh, ow], [top, left], [th, tw]]
    aesthetic: list | None = None  # [score, negative score] for refiners, else None
    steps: int | None = None
    guidance: float = 5.0
    dtype: str = "F32"
    image_dtype: str | None = None  # dtype of the image run (default: F32 reference, or dtype)
    merge: bool = False
    graph: bool = False
    device: str = "CPU"  # MindSpore device target, or the torch device for pt
    progress: bool = False
    activations: bool = True  # False: image only (``infer``), no per-layer recording
    noise_source: str | None = None  # where arrays["latents"] came from (sides.environment.latents_source)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # latents, input_ids, ...
    backend: str | None = None  # diffusers | port | mindone (None: the side's default, diffusers / port)
    port_numerics: str | None = None  # the port's numerics spec (backends.mindspore.numerics; None: default)
    # replay every aligned block on the reference's inputs (``arrays["ref/NAME"]``, by this side's names; a
    # PyTorch fp32 side without refs replays on its own outputs), with and without the LoRA
    max_sequence_length: int | None = None  # SD3 / Flux: T5 tokens encoded (None: 256)
    replay: bool = True
    replay_only: bool = False  # no chained pass: only the replayed blocks (the reference side always chains)

    def refs(self) -> dict[str, np.ndarray]:
        """The reference's block outputs this side replays on, by this side's names."""
        return {k[len(REF):]: v for k, v in self.arrays.items() if k.startswith(REF)}

    def refs_digest(self) -> str | None:
        """SHA-256 of the replay's references (None without): a kept capture replayed other inputs if it differs."""
        import hashlib

        refs = self.refs()
        if not refs:
            return None
        h = hashlib.sha256()
        for k in sorted(refs):
            h.update(k.encode())
            h.update(np.ascontiguousarray(refs[k]).tobytes())
        return h.hexdigest()[:16]

    @property
    def backend_name(self) -> str:
        return self.backend or {"pt": "diffusers", "ms": "port"}[self.side]

    def fingerprint(self) -> dict:
        """What two captures must share to be compared: the exact inputs (arrays by SHA-256)."""
        import hashlib

        keys = ("prompt", "timesteps", "size_cond", "aesthetic", "steps", "guidance")
        out = {k: getattr(self, k) for k in keys}
        out["arrays"] = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]
                         for k, v in sorted(self.arrays.items()) if not k.startswith(REF)}
        return out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in asdict(self).items() if k != "arrays"}
        (folder / REQUEST_JSON).write_text(json.dumps(meta, indent=1, allow_nan=False))
        _write_arrays(folder / ARRAYS, self.arrays)

    @classmethod
    def load(cls, folder: Path) -> "SideRequest":
        meta = json.loads((folder / REQUEST_JSON).read_text())
        return cls(**meta, arrays=_read_arrays(folder / ARRAYS))


@dataclass
class SideResult:
    """Activations by the side's own names, images, and measurements (``meta``)."""

    acts: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # "image" (float32 H,W,3 in [0,1])
    meta: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"act/{k}": v for k, v in self.acts.items()}
        arrays.update({f"img/{k}": v for k, v in self.images.items()})
        _write_arrays(folder / ARRAYS, arrays)
        (folder / RESULT_JSON).write_text(json.dumps(
            {"meta": self.meta, "order": list(self.acts)}, indent=1, allow_nan=False, default=_jsonable))

    @classmethod
    def load(cls, folder: Path) -> "SideResult":
        info = json.loads((folder / RESULT_JSON).read_text())
        arrays = _read_arrays(folder / ARRAYS)
        acts = {k: arrays[f"act/{k}"] for k in info["order"]}
        images = {k[4:]: v for k, v in arrays.items() if k.startswith("img/")}
        return cls(acts, images, info["meta"])


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # activations are float32 or lower computed values: float64 copies are widened exactly,
    # so storing float32 loses nothing
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if v.dtype == np.float64:
            v = v.astype(np.float32)
        out[k] = Tensor.from_numpy(np.ascontiguousarray(v))
    write_safetensors(path, out)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    tensors, _ = read_safetensors(path)
    return {k: np.array(t.data) for k, t in tensors.items()}
