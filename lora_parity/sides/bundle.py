"""Capture bundles: one backend's run written to a folder, judged later, anywhere.

The seed of this project compared MindSpore on an Ascend host with PyTorch on a GPU host;
a bundle makes that the architecture.  ``lora-parity capture --backend B ... -o DIR`` runs
one backend and writes:

* ``bundle.json`` - format/version, backend, side, activation naming, dtype, device, the
  base and LoRA it ran (path + SHA-256 of the LoRA), library versions;
* ``result.json`` + ``arrays.safetensors`` - the capture (:class:`SideResult`): activations
  by the backend's own names, the token ids it used (``_inputs.*``), images, timings, peak
  memory, and the fingerprint of its inputs;
* ``request/`` - the exact request (prompt, timesteps, size conditioning, steps, guidance,
  latents and any token ids it was given);
* ``configs/`` - the model's config files (model_index, unet, vae, text encoders), from
  which the judge derives the layout and the alignment without the weights.

``lora-parity compare --ms-bundle A --pt-bundle B`` checks that both ran the same inputs on
the same model configuration and judges them exactly as a one-machine ``compare`` does
(which is the same two captures, run as child processes one after the other).
Safetensors + JSON only: a bundle from another machine is read without unpickling anything.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_parity.errors import LoraParityError
from lora_parity.sides.request import SideRequest, SideResult

FORMAT = "lora-parity-bundle"
VERSION = 1
MANIFEST = "bundle.json"
CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "text_encoder_2/config.json", "scheduler/scheduler_config.json",
                "transformer/config.json", "text_encoder_3/config.json")  # SD3 / Flux
# request fields two captures must share to be compared (arrays: the latents, compared by hash)
SAME_INPUTS = ("prompt", "timesteps", "size_cond", "aesthetic", "steps", "guidance")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def configs_digest(folder: Path) -> str:
    """One hash over the model's config files (same configs: same architecture and layout)."""
    h = hashlib.sha256()
    for rel in CONFIG_FILES:
        f = folder / rel
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}  # versions / paths of the writer
            h.update(rel.encode() + json.dumps(cfg, sort_keys=True, allow_nan=False).encode())
    return h.hexdigest()[:16]


@dataclass
class Bundle:
    folder: Path
    manifest: dict
    request: SideRequest
    result: SideResult

    @property
    def configs(self) -> Path:
        return self.folder / "configs"

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]


def write_bundle(out: Path, req: SideRequest, result: SideResult, *, base: str | None, lora: str | None,
                 force: bool = False, replayed_on: str | None = None) -> Path:
    """Write the bundle folder atomically (``out.tmp-*`` then rename); refuse to replace one without ``force``."""
    import os

    from lora_parity.backends import get_backend

    out = Path(out)
    if out.exists() and not force:
        raise LoraParityError("output exists (use --force to replace it)", path=out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result.save(tmp)
        from dataclasses import replace as _replace

        from lora_parity.sides.request import REF

        # the replay's references are the PyTorch bundle's own outputs: named (replayed_on), not copied
        _replace(req, arrays={k: v for k, v in req.arrays.items() if not k.startswith(REF)}).save(tmp / "request")
        pdir = Path(req.pipeline_dir)
        for rel in CONFIG_FILES:
            if (pdir / rel).is_file():
                (tmp / "configs" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(pdir / rel, tmp / "configs" / rel)
        be = get_backend(req.backend_name)
        manifest = {
            "format": FORMAT, "version": VERSION, "backend": be.name, "side": be.side, "naming": be.naming,
            "dtype": req.dtype, "device": req.device, "base": base or req.pipeline_dir,
            "configs_digest": configs_digest(pdir), "lora": lora,
            "lora_sha256": sha256_file(Path(lora)) if lora else None,
            "versions": result.meta.get("versions"), "peak_rss_bytes": result.meta.get("peak_rss_bytes"),
            "seconds": result.meta.get("seconds"),
            "numerics_env": result.meta.get("numerics_env"),  # sides.environment: what compare checks for drift
            "replayed_on": replayed_on,  # the diffusers bundle whose outputs every block was replayed on, or None
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_bundle(folder: Path) -> Bundle:
    folder = Path(folder)
    f = folder / MANIFEST
    if not f.is_file():
        raise LoraParityError(f"not a capture bundle (no {MANIFEST})", path=folder)
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise LoraParityError(f"unreadable {MANIFEST}: {exc.msg}", path=f) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise LoraParityError(f"not a {FORMAT} version {VERSION}", path=f)
    check_backend_naming(manifest, folder)
    try:
        return Bundle(folder, manifest, SideRequest.load(folder / "request"), SideResult.load(folder))
    except (OSError, KeyError, ValueError) as exc:
        raise LoraParityError(f"incomplete capture bundle ({exc})", path=folder) from None


def check_backend_naming(manifest: dict, folder: Path) -> None:
    """The manifest names a backend this version knows, with that backend's side and activation naming:
    the judge aligns activations by the naming, so an unknown one would judge nothing or the wrong pairs."""
    from lora_parity.backends import BACKENDS, get_backend

    name = manifest.get("backend")
    if not isinstance(name, str) or name not in BACKENDS:
        raise LoraParityError(f"bundle names an unknown backend {name!r} (known: {', '.join(BACKENDS)})",
                              path=folder)
    be = get_backend(name)
    if manifest.get("naming") != be.naming or manifest.get("side") != be.side:
        raise LoraParityError(f"bundle names naming {manifest.get('naming')!r} / side {manifest.get('side')!r}, "
                              f"but backend {name} records {be.naming!r} names on side {be.side!r}", path=folder)


def check_same_inputs(a: Bundle, b: Bundle) -> None:
    """Both bundles ran the same inputs on the same model configuration, or one error naming what differs."""
    diff = []
    if a.manifest["configs_digest"] != b.manifest["configs_digest"]:
        diff.append("model configs")
    fa, fb = a.result.meta.get("inputs", {}), b.result.meta.get("inputs", {})
    diff += [k for k in SAME_INPUTS if fa.get(k) != fb.get(k)]
    if fa.get("arrays", {}).get("latents") != fb.get("arrays", {}).get("latents"):
        diff.append("latents")
    for k in sorted(set(a.result.acts) & set(b.result.acts)):
        if k.startswith("_inputs.") and not np.array_equal(a.result.acts[k], b.result.acts[k]):
            diff.append(f"token ids ({k[len('_inputs.'):]})")
    if diff:
        raise LoraParityError(f"the bundles were captured from different inputs: {', '.join(diff)}",
                              path=f"{a.folder} vs {b.folder}")
