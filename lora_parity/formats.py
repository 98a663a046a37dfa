"""File formats: read any LoRA file into named halves, write a LoraSet in one format.

Formats: ``ms`` (MindONE names, ``.ckpt`` protobuf or MindSpore safetensors),
``peft`` (diffusers ``save_lora_weights``), ``kohya`` (sd-scripts SDXL).  The
format of an input is detected from its content, never from its name alone.
Pickles are only read with ``torch.load(weights_only=True)`` and only when the
extension asks for it.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from . import ckpt_io
from .atomic import atomic_output
from .errors import CheckpointFormatError, LoraParityError
from .keymap import UNET_DIFFUSERS, kohya_name
from .lora_set import LoraPair, LoraSet, NamedHalves
from .safetensors_io import is_safetensors, read_safetensors, write_safetensors
from .tensor import Tensor, storage_dtype

FORMATS = ("peft", "kohya", "ms")
PICKLE_EXTS = (".bin", ".pt", ".pth")
MODEL_ROOTS = ("model.diffusion_model.", "conditioner.embedders.")
# MindSpore optimizer / EMA state that shadows parameter names: listed, never converted
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accum.", "optimizer.",
                      "ema.", "vhat.", "mean_grad.", "mean_square.", "lamb_m.", "lamb_v.")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers reads for PEFT LoraConfig kwargs
OUR_METADATA_KEY = "lora_parity"

_MS_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<half>[AB])\.weight$")
_PEFT_RE = re.compile(r"^(?P<comp>unet|text_encoder|text_encoder_2)\.(?P<mod>.+)"
                      r"\.(?:lora_(?P<half>[AB])\.weight|(?P<alpha>alpha))$")
_KOHYA_RE = re.compile(r"^(?P<mod>lora_(?:unet|te1|te2|te)_.+?)\.(?:lora_(?P<half>down|up)\.weight|(?P<alpha>alpha))$")


def read_tensors(path: str | Path, *, progress: bool = False) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """(tensors, metadata, container) for a .ckpt, safetensors or (asked-for) pickle file."""
    path = Path(path)
    if not path.is_file():
        raise LoraParityError("no such file", path=path)
    if path.stat().st_size == 0:
        raise CheckpointFormatError("empty file", path=path)
    if is_safetensors(path) and not ckpt_io.is_ckpt(path):
        tensors, meta = read_safetensors(path)
        return tensors, meta, "safetensors"
    if path.suffix.lower() in PICKLE_EXTS and not ckpt_io.is_ckpt(path):
        return _read_pickle(path), {}, "pickle"
    # everything else is parsed as a .ckpt, whose reader says precisely what is wrong
    # (truncated, encrypted, corrupt record, ...)
    return ckpt_io.read_ckpt(path, progress=progress), {}, "ckpt"


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        import torch
    except ImportError:
        raise LoraParityError("reading .bin/.pt needs torch; use safetensors", path=path) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles
        raise CheckpointFormatError(f"cannot be loaded safely (weights_only): {str(exc).splitlines()[0]}",
                                    path=path) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError("does not hold a dict of tensors", path=path)
    return {str(k): _from_torch(v, path, str(k)) for k, v in obj.items()}


def _from_torch(t, path, key) -> Tensor:
    import torch
    if not isinstance(t, torch.Tensor):
        raise CheckpointFormatError(f"is a {type(t).__name__}, not a tensor", path=path, key=key)
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return Tensor("BF16", t.view(torch.int16).numpy().view(np.uint16))
    return Tensor.from_numpy(t.numpy())


def detect_format(tensors: dict[str, Tensor]) -> str:
    """'ms', 'peft' or 'kohya' by what the majority of LoRA keys look like."""
    votes = Counter()
    for k in tensors:
        if _KOHYA_RE.match(k):
            votes["kohya"] += 1
        elif _PEFT_RE.match(k):
            votes["peft"] += 1
        elif _MS_RE.match(k) and k.startswith(MODEL_ROOTS):
            votes["ms"] += 1
    return votes.most_common(1)[0][0] if votes else "unknown"


def parse(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], fmt: str) -> NamedHalves:
    """Group a file's keys into modules; classify the rest as skipped or unknown."""
    space = {"ms": "sgm", "peft": "diffusers", "kohya": "kohya"}[fmt]
    h = NamedHalves(path=path, space=space, fmt=fmt, modules={}, keys={})
    regex = {"ms": _MS_RE, "peft": _PEFT_RE, "kohya": _KOHYA_RE}[fmt]
    for key, t in tensors.items():
        m = regex.match(key)
        if m is None or (fmt == "ms" and not key.startswith(MODEL_ROOTS)):
            if key.startswith(OPTIMIZER_PREFIXES) or "lora" not in key.lower():
                h.skipped.append(key)
            else:
                h.unknown.append(key)
            continue
        mod = m.group("mod")
        if fmt == "peft":
            mod = f"{m.group('comp')}.{mod}"
            if m.group("comp") == "text_encoder" and not mod.startswith("text_encoder.text_model."):
                # written by diffusers with transformers 5, whose CLIPTextModel has no "text_model."
                mod = "text_encoder.text_model." + mod[len("text_encoder."):]
        if m.groupdict().get("alpha"):
            if t.shape not in ((), (1,)):
                raise CheckpointFormatError(f"alpha must be a scalar, got shape {list(t.shape)}", path=path, key=key)
            h.alpha_overrides[mod] = float(t.to_float().reshape(-1)[0])
            continue
        half = {"down": "A", "up": "B"}.get(m.group("half"), m.group("half"))
        h.modules.setdefault(mod, {})[half] = t
        h.keys.setdefault(mod, {})[half] = key
    for mod in list(h.alpha_overrides):
        if mod not in h.modules:
            h.unknown.append(f"{mod}.alpha")
    if fmt == "peft":
        h.default_alpha = _peft_alphas(path, metadata, h)
    return h


def _peft_alphas(path: Path, metadata: dict[str, str], h: NamedHalves) -> dict[str, float]:
    """diffusers' ``lora_adapter_metadata``: '<component>.lora_alpha' plus alpha_pattern."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CheckpointFormatError(f"corrupt '{ADAPTER_METADATA_KEY}' header metadata", path=path) from None
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        if f"{comp}.lora_alpha" in meta:
            out[comp] = float(meta[f"{comp}.lora_alpha"])
        for mod, a in (meta.get(f"{comp}.alpha_pattern") or {}).items():
            h.alpha_overrides[f"{comp}.{mod}"] = float(a)
    return out


# ---------------------------------------------------------------- writers

def pair_tensors(p: LoraPair, fmt: str, te_kohya: dict[str, str]) -> list[tuple[str, Tensor, str]]:
    """(key, tensor, role) stored for one module in ``fmt``; role is 'A', 'B' or 'alpha'."""
    if fmt == "ms":
        return [(f"{p.module.sgm}.lora_A.weight", p.A, "A"), (f"{p.module.sgm}.lora_B.weight", p.B, "B")]
    n = len(p.module.diffusers)
    rows = p.B.shape[0] // n
    out = []
    for i, dif in enumerate(p.module.diffusers):
        b = p.B if n == 1 else Tensor(p.B.dtype, p.B.data[i * rows:(i + 1) * rows])
        if fmt == "peft":
            out += [(f"{dif}.lora_A.weight", p.A, "A"), (f"{dif}.lora_B.weight", b, "B")]
        else:
            kn = kohya_name(p.module, i, te_prefixes=te_kohya)
            out += [(f"{kn}.lora_down.weight", p.A, "A"), (f"{kn}.lora_up.weight", b, "B"),
                    (f"{kn}.alpha", kohya_alpha(p.alpha, p.A.dtype), "alpha")]
    return out


def kohya_alpha(alpha: float, dtype: str) -> Tensor:
    """A kohya ``.alpha``: a 0-d tensor in the LoRA's own dtype, as sd-scripts saves it.

    sd-scripts registers alpha as a 0-d buffer and ``save_weights`` casts the whole state
    dict to the save dtype.  A shape-[1] alpha breaks its LoRAModule: ``alpha.numpy() / rank``
    becomes a 1-element array, which promotes an fp16 forward to float32 and fails bf16, and
    ``load_state_dict`` (training with ``--network_weights``) rejects the shape.  If the alpha
    is not exactly representable in a half dtype (e.g. 0.1 in fp16) it is written in float32
    instead: scale = alpha / rank is kept exactly, and every loader reads either dtype.
    (``Tensor.from_numpy`` cannot build it: ``np.ascontiguousarray`` turns 0-d into shape [1].)
    """
    if dtype == "F64":
        return Tensor("F64", np.array(alpha, dtype=storage_dtype("F64")).reshape(()))
    if dtype in ("F16", "BF16"):
        narrow = Tensor.from_numpy(np.array([alpha], dtype=np.float32), dtype)
        narrow = Tensor(dtype, narrow.data.reshape(()))
        if float(narrow.to_float()) == float(np.float32(alpha)):
            return narrow
    return Tensor("F32", np.array(alpha, dtype=storage_dtype("F32")).reshape(()))


def tensors_for(lora: LoraSet, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The exact key -> tensor dict (and header metadata) a format stores."""
    te_kohya = lora.keymap.te_kohya
    out = {k: t for p in lora.ordered() for k, t, _ in pair_tensors(p, fmt, te_kohya)}
    meta: dict[str, str] = {}
    if fmt == "peft":
        meta[ADAPTER_METADATA_KEY] = json.dumps(_adapter_metadata(lora), sort_keys=True, allow_nan=False)
        meta["format"] = "pt"
    if fmt != "ms":
        meta[OUR_METADATA_KEY] = json.dumps({"layout": lora.layout.name, "source_format": lora.source_format},
                                            allow_nan=False)
    return out, meta


def _adapter_metadata(lora: LoraSet) -> dict:
    """diffusers' per-component LoraConfig kwargs: most common r/alpha plus exact patterns."""
    per_comp: dict[str, list[tuple[str, int, float]]] = {}
    for p in lora.ordered():
        for dif in p.module.diffusers:
            comp, mod = dif.split(".", 1)
            # transformers 5 flattens CLIPTextModel (no "text_model."); PEFT matches target
            # names as suffixes, so the unprefixed name fits both old and new module trees
            mod = mod.removeprefix("text_model.")
            per_comp.setdefault(comp, []).append((mod, p.rank, p.alpha))
    adapter = {}
    for comp, mods in per_comp.items():
        r = Counter(rr for _, rr, _ in mods).most_common(1)[0][0]
        a = Counter(aa for _, _, aa in mods).most_common(1)[0][0]
        adapter[f"{comp}.r"] = r
        adapter[f"{comp}.lora_alpha"] = a
        adapter[f"{comp}.target_modules"] = sorted({m for m, _, _ in mods})
        adapter[f"{comp}.rank_pattern"] = {m: rr for m, rr, _ in mods if rr != r}
        adapter[f"{comp}.alpha_pattern"] = {m: aa for m, _, aa in mods if aa != a}
    return adapter


def write(path: Path, lora: LoraSet, fmt: str) -> tuple[int, int]:
    """Atomically write ``lora`` as ``fmt``; the container follows the extension. Returns (bytes, tensors)."""
    tensors, meta = tensors_for(lora, fmt)
    suffix = path.suffix.lower()
    if fmt == "ms":
        if suffix == ".safetensors":
            return write_safetensors(path, tensors, {"format": "ms"}), len(tensors)
        ckpt_io.write_ckpt(path, tensors)
        return path.stat().st_size, len(tensors)
    if suffix in PICKLE_EXTS:
        return _write_pickle(path, tensors), len(tensors)
    return write_safetensors(path, tensors, meta), len(tensors)


def _write_pickle(path: Path, tensors: dict[str, Tensor]) -> int:
    try:
        import torch
    except ImportError:
        raise LoraParityError("writing .bin/.pt needs torch; use .safetensors", path=path) from None
    out = {}
    for k, t in tensors.items():
        if t.dtype == "BF16":
            out[k] = torch.from_numpy(t.data.view(np.int16).copy()).view(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(t.data.copy())
    with atomic_output(path) as fh:
        torch.save(out, fh)
    return path.stat().st_size


def component_of(diffusers_name: str) -> str:
    return "unet" if diffusers_name.startswith(UNET_DIFFUSERS) else diffusers_name.split(".", 1)[0]
