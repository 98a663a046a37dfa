"""``--base SPEC`` -> :class:`BaseModel`: one diffusers folder for PyTorch, one SGM weight source for MindSpore.

SPEC is a diffusers pipeline folder (has ``model_index.json``), an official SGM
single-file checkpoint (``sd_xl_base_1.0.safetensors``), or ``random:NAME[:SEED]``
(NAME in ``sdxl-base``, ``sdxl-refiner``, ``tiny``, ``tiny-refiner``).  Nothing is
downloaded: single files and random models are turned into a diffusers folder in
the cache once (:func:`default_cache_dir`) and reused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lora_parity.errors import LoraParityError
from lora_parity.convert.layout import UNetLayout, layout_from_pipeline_dir
from lora_parity.bases.configs import PIPELINES, SD_FAMILY_PIPELINES, pipeline_configs
from lora_parity.bases.flow_configs import FLOW_PIPELINES, PIPELINE_CLASSES
from lora_parity.bases.sources import COMPONENTS, DiffusersFolderWeights, SgmWeights, weight_files

RANDOM_PREFIX = "random:"


def default_cache_dir() -> Path:
    """``$LORA_PARITY_CACHE``, else ``$XDG_CACHE_HOME/lora-parity``, else ``~/.cache/lora-parity``."""
    if os.environ.get("LORA_PARITY_CACHE"):
        return Path(os.environ["LORA_PARITY_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lora-parity"


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model; see the module docstring.  ``variant`` names the diffusers weight files."""

    spec: str
    kind: str  # "diffusers" | "single-file" | "random"
    pipeline_dir: Path
    variant: str | None
    layout_name: str
    is_refiner: bool
    default_image_size: int
    single_file: Path | None = None

    def sgm_weights(self) -> SgmWeights:
        """The MindSpore side's weights: the single file itself, else the diffusers folder."""
        if self.kind == "single-file":
            from lora_parity.bases.single_file import SingleFileWeights

            return SingleFileWeights(self.single_file, pipeline_configs(self.layout_name))
        return DiffusersFolderWeights(self.pipeline_dir, self.variant)


def resolve_base(spec: str, *, variant: str | None = None, cache: Path | None = None,
                 progress: bool = False) -> BaseModel:
    """Resolve SPEC (generating or materializing into ``cache`` when needed); bad SPEC -> LoraParityError."""
    cache = Path(cache) if cache is not None else default_cache_dir()
    if spec.startswith(RANDOM_PREFIX):
        return _random(spec, cache, progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _diffusers(spec, path, variant)
    if path.is_file():
        return _single_file(spec, path, cache)
    raise LoraParityError("no such file or folder (want a diffusers pipeline folder, an SGM single-file "
                          f"checkpoint, or {RANDOM_PREFIX}{{{','.join([*PIPELINES, *SD_FAMILY_PIPELINES, *FLOW_PIPELINES])}}}"
                          f"[:SEED])", path=spec)


def _random(spec: str, cache: Path, progress: bool) -> BaseModel:
    from lora_parity.bases.random_weights import VARIANT, ensure_random_pipeline

    name, _, seed_s = spec[len(RANDOM_PREFIX):].partition(":")
    known = {**PIPELINES, **SD_FAMILY_PIPELINES, **FLOW_PIPELINES}
    if name not in known:
        raise LoraParityError(f"unknown random model {name!r} (known: {', '.join(known)})", path=spec)
    try:
        seed = int(seed_s) if seed_s else 0
        if seed < 0:
            raise ValueError
    except ValueError:
        raise LoraParityError(f"seed {seed_s!r} is not a non-negative integer", path=spec) from None
    cfgs = known[name]
    folder = ensure_random_pipeline(cache, cfgs, seed, spec, progress=progress)
    return BaseModel(spec, "random", folder, VARIANT, name, cfgs.is_refiner, cfgs.image_size)


def _diffusers(spec: str, path: Path, variant: str | None) -> BaseModel:
    index = path / "model_index.json"
    if not index.is_file():
        raise LoraParityError("not a diffusers pipeline folder (no model_index.json)", path=path)
    try:
        mi = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise LoraParityError(f"cannot read model_index.json: {exc}", path=index) from None
    if mi.get("_class_name") in PIPELINE_CLASSES.values():  # SD3 / Flux: a transformer, never a refiner
        return _flow_diffusers(spec, path, variant, mi)
    layout = layout_from_pipeline_dir(path)
    for comp in COMPONENTS:
        if (path / comp / "config.json").is_file():
            weight_files(path / comp, variant)  # one clear error for a missing variant
    if layout.family != "sdxl":  # SD 1.x / 2.x: one text encoder, never a refiner
        name = next((n for n, c in SD_FAMILY_PIPELINES.items()
                     if UNetLayout.from_diffusers_config(c.unet, name=layout.unet.name) == layout.unet), path.name)
        return BaseModel(spec, "diffusers", path, variant, name, False, _image_size(path))
    refiner = bool(mi.get("requires_aesthetics_score")) or not (path / "text_encoder" / "config.json").is_file()
    return BaseModel(spec, "diffusers", path, variant, _layout_name(layout.unet, refiner, path.name), refiner,
                     _image_size(path))


def _flow_diffusers(spec: str, path: Path, variant: str | None, mi: dict) -> BaseModel:
    """An SD3 / Flux folder: named after the built-in pipeline whose transformer config it has."""
    comps = [c for c, v in mi.items() if not c.startswith("_") and isinstance(v, list) and v[0] is not None
             and (path / c / "config.json").is_file() and not c.startswith(("tokenizer", "scheduler"))]
    for comp in comps:
        weight_files(path / comp, variant)  # one clear error for a missing variant
    try:
        cfg = json.loads((path / "transformer" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoraParityError(f"cannot read transformer/config.json: {exc}", path=path) from None
    plain = {k: v for k, v in cfg.items() if not k.startswith("_")}
    name = next((n for n, c in FLOW_PIPELINES.items()
                 if all(plain.get(k) == v for k, v in c.transformer.items() if not k.startswith("_"))), path.name)
    size = FLOW_PIPELINES[name].image_size if name in FLOW_PIPELINES else int(cfg.get("sample_size") or 128) * 8
    return BaseModel(spec, "diffusers", path, variant, name, False, size)


def _single_file(spec: str, path: Path, cache: Path) -> BaseModel:
    from lora_parity.bases.single_file import SingleFileWeights, materialize

    weights = SingleFileWeights(path)
    folder = materialize(weights, cache)
    cfgs = weights.cfgs
    return BaseModel(spec, "single-file", folder, weights.variant, cfgs.name, cfgs.is_refiner, cfgs.image_size,
                     single_file=path)


def _layout_name(unet: UNetLayout, refiner: bool, fallback: str) -> str:
    """The built-in name whose UNet this is (names aside), else the folder's name."""
    for name, cfgs in PIPELINES.items():
        ref = UNetLayout.from_diffusers_config(cfgs.unet, name=unet.name)
        if cfgs.is_refiner == refiner and ref == unet:
            return name
    return fallback


def _image_size(path: Path) -> int:
    """UNet sample size times the VAE's downscale factor (1024 for SDXL, 32 for tiny)."""
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoraParityError(f"cannot read unet/vae config: {exc!r}", path=path) from None
