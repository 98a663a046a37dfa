"""File formats: read any LoRA file into named halves, write a LoraSet in one format.

Formats: ``ms`` (MindONE names, ``.ckpt`` protobuf or MindSpore safetensors),
``peft`` (diffusers ``save_lora_weights``), ``kohya`` (sd-scripts SDXL).  The
format of an input is detected from its content, never from its name alone.
Pickles are only read with ``torch.load(weights_only=True)`` and only when the
extension asks for it.

MindONE checkpoints come in more shapes than the plain ``*_lora.ckpt``; what the
reader accepts was checked against MindONE's own code (mindspore-lab/mindone):

* ``examples/stable_diffusion_xl/gm/helpers.py`` ``save_checkpoint`` writes the
  names holding ``lora_`` to ``<name>_lora.ckpt`` and, with EMA, the EMA copies to
  ``<name>_lora_ema.ckpt`` under the *same* names: it strips the in-memory
  ``ema.`` prefix (``EMA`` clones the trainable parameters with
  ``ParameterTuple.clone(prefix="ema")``, which MindSpore spells ``"ema." + name``)
  and the first ``._backbone`` ("save checkpoint bug on mindspore 2.1.0").
  ``gm/models/diffusion.py`` ``load_pretrained`` removes every ``._backbone``
  ("parameter auto-prefix name bug on mindspore 2.2.10") and reads a
  ``global_step`` entry; ``DiffusionEngineMultiGraph.save_checkpoint`` renames its
  ``stage1.`` / ``stage2.`` UNet halves to ``model.``.  Older or hand-saved files
  may keep any of these, so they are normalised here.  An older ``helpers.py``
  (mindone commit 0387c2fb) had the same ``EMA`` class but sent every ``lora_``
  name, ``ema.`` ones included, into the one ``_lora.ckpt``: saving the EMA cell
  (as ``train.py`` does, ``save_checkpoint(model if not ema else ema, ...)``) gives a
  file holding both sets, which needs ``--ema`` / ``--no-ema``.
* ``mindone/trainers/ema.py`` also keeps ``swap.``-prefixed copies (its
  ``swap_cache``); ``mindone/trainers/train_step.py`` keeps
  ``grad_accumulated_.``-prefixed gradient buffers, gm's
  ``gm/models/trainer_factory.py`` ``accum_grad.`` ones, and gm's ``train.py``
  strips ``ldm_with_loss_grad.optimizer.`` from optimizer files (MindSpore's
  auto-prefix puts wrapper attribute names in front of parameter names).
  MindSpore's ``AdamWeightDecay`` keeps ``adam_m.`` / ``adam_v.`` copies of every
  trained tensor plus ``global_step`` and ``learning_rate`` (``nn.Adam``:
  ``moment1.`` / ``moment2.``, ``beta1_power`` / ``beta2_power``); checked with
  mindspore 2.10, whose ``save_checkpoint(optimizer)`` (gm's ``optimizer.ckpt``)
  also writes the trained tensors themselves under their own names.
* ``mindone/trainers/callback.py`` ``EvalSaveCallback`` saves the trainable
  parameters with ``append_dict={"lora_rank": ...}`` and a ``train_resume.ckpt``
  of the whole train network (base weights, optimizer state, ``scale_sense``,
  EMA) with ``epoch_num`` / ``cur_step`` / ``loss_scale``.
* gm's ``UNetModel_lora`` trains no bias (``mark_only_lora_as_trainable(bias="none")``)
  and ``save_checkpoint`` keeps only ``lora_`` names, so no MindONE path found
  writes a bias into a LoRA file; ``gm/modules/lora/utils.py`` ``lora_state_dict``
  does support ``bias="lora_only"`` (``<module>.lora_A.weight`` -> ``<module>.bias``,
  the layer's whole trained bias), which is what a LoRA-only file with ``.bias``
  entries is read as.

Everything that is not the chosen LoRA set is listed by kind in the
conversion summary; optimizer copies of LoRA tensors are never taken as LoRA.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_parity.convert import bfl, ckpt_io
from lora_parity.atomic import atomic_output
from lora_parity.errors import CheckpointFormatError, LoraParityError
from lora_parity.convert.keymap import UNET_DIFFUSERS, kohya_dotted_name, kohya_name
from lora_parity.convert.lora_set import LoraPair, LoraSet, NamedHalves, split_parts
from lora_parity.convert.safetensors_io import is_safetensors, read_safetensors, write_safetensors
from lora_parity.convert.tensor import Tensor, storage_dtype

FORMATS = ("peft", "kohya", "ms")
PICKLE_EXTS = (".bin", ".pt", ".pth")
MODEL_ROOTS = ("model.diffusion_model.", "conditioner.embedders.", "cond_stage_model.")
# MindSpore optimizer / EMA state that shadows parameter names: listed, never converted
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "moments.", "accum.", "optimizer.",
                      "ema.", "vhat.", "mean_grad.", "mean_square.", "lamb_m.", "lamb_v.")
WRAPPED_MODEL = "wrapped-model"  # LoraSet.source_kind of a LoRA taken from a whole PEFT-wrapped model checkpoint
LDM_RANK_KEY = "lora_rank"  # MindONE's LDM LoRA checkpoints: the rank every LoRADenseLayer is built with
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers reads for PEFT LoraConfig kwargs
OUR_METADATA_KEY = "lora_parity"

# MindONE names: gm (SDXL) ``<module>.lora_A/B.weight``; the LDM port (SD 1.x / 2.x, ``LoRADenseLayer``)
# ``<module>.lora_down/up.weight``
_MS_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<half>[AB]|down|up)\.weight$")
# PEFT / kohya keys for a bias that belongs to a LoRA (never silently skipped, see _refuse_pt_bias)
_PEFT_BIAS_RE = re.compile(r"^(?:unet|transformer|text_encoder|text_encoder_[23])\..+\.bias$")
_KOHYA_BIAS_RE = re.compile(r"^lora_(?:unet|transformer|te1|te2|te3|te)_.+\.(?:diff_b|bias|lora_(?:up|down)\.bias)$")
# PEFT names, and the older diffusers names its SDXL/dreambooth training scripts still save through
# ``convert_state_dict_to_diffusers`` (``<module>.lora.down.weight``; text encoders
# ``<module>.lora_linear_layer.up.weight``): the same tensors, down = lora_A, up = lora_B, no alpha
_PEFT_RE = re.compile(r"^(?P<comp>unet|transformer|text_encoder|text_encoder_[23])\.(?P<mod>.+?)"
                      r"\.(?:lora_(?P<half>[AB])\.weight|(?:lora|lora_linear_layer)\.(?P<old>down|up)\.weight"
                      r"|(?P<alpha>alpha))$")
_KOHYA_RE = re.compile(r"^(?P<mod>lora_(?:unet|transformer|te1|te2|te3|te)_.+?)\.(?:lora_(?P<half>down|up)\.weight|(?P<alpha>alpha))$")
# a whole PEFT-wrapped model saved by MindSpore: mindone.diffusers' LoRA trainers write
# ``checkpoint-N/pytorch_model.ckpt`` with ``ms.save_checkpoint(unet, ...)`` after ``unet.add_adapter(LoraConfig)``:
# every UNet parameter under its diffusers path, adapted layers as ``<module>.base_layer.weight`` next to
# ``<module>.lora_A.<adapter>.weight`` / ``lora_B``; no alpha (the trainers use lora_alpha = rank)
_WRAPPED_RE = re.compile(r"^(?P<mod>(?:down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding|add_embedding"
                         r"|transformer_blocks|single_transformer_blocks|pos_embed|x_embedder|context_embedder"
                         r"|time_text_embed|norm_out|proj_out)"
                         r"(?:\..+?)?)\.lora_(?P<half>[AB])\.(?P<adapter>[A-Za-z0-9_\-]+)\.weight$")
#: the top-level modules of an SD3 / Flux transformer (a wrapped checkpoint of the transformer, not a UNet)
_TRANSFORMER_ROOTS = ("transformer_blocks", "single_transformer_blocks", "pos_embed", "x_embedder", "context_embedder",
                      "time_text_embed", "norm_out", "proj_out")
# MindONE's port of sd-scripts (examples/kohya_sd_scripts) saves ``LoRANetwork.save_weights`` to a .ckpt as
# prefix + "." + the module's dotted path (``lora_unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight``,
# ``lora_te1.text_model.encoder.layers.0.self_attn.q_proj.alpha``): its parameters_and_names() names
_KOHYA_DOTTED_RE = re.compile(r"^(?P<prefix>lora_(?:unet|te1|te2|te))\.(?P<path>.+?)"
                              r"\.(?P<tail>lora_(?:down|up)\.weight|alpha)$")
#: header metadata kept from a kohya source: sd-scripts' training record and SAI model spec.  Its
#: ``sshs_*`` hashes cover the original file's bytes and are dropped (a converted file has other bytes)
KOHYA_META_PREFIXES = ("ss_", "modelspec.")
#: sd-scripts' ``ss_base_model_version`` per family (``sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0``,
#: ``model_util.get_model_version_str_for_sd1_sd2`` without the v-parameterisation suffix a LoRA cannot tell)
KOHYA_BASE_VERSION = {"sdxl": "sdxl_base_v1-0", "sd1": "sd_v1", "sd2": "sd_v2"}
#: components a PEFT file's adapter metadata may describe (diffusers' ``<component>.lora_alpha`` keys)
PEFT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def read_tensors(path: str | Path, *, progress: bool = False,
                 non_tensor: list[str] | None = None) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """(tensors, metadata, container) for a .ckpt, safetensors or (asked-for) pickle file.

    ``non_tensor``: a list receiving the names of a .ckpt's non-tensor records
    (``append_dict`` strings) instead of a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraParityError("no such file", path=path)
    if path.stat().st_size == 0:
        raise CheckpointFormatError("empty file", path=path)
    if ckpt_io.is_encrypted(path):  # ciphertext can pass any sniff below
        raise CheckpointFormatError(ckpt_io.ENCRYPTED_MSG, path=path)
    if is_safetensors(path) and not ckpt_io.is_ckpt(path):
        tensors, meta = read_safetensors(path)
        return tensors, meta, "safetensors"
    if path.suffix.lower() in PICKLE_EXTS and not ckpt_io.is_ckpt(path):
        return _read_pickle(path), {}, "pickle"
    # everything else is parsed as a .ckpt, whose reader says precisely what is wrong
    # (truncated, encrypted, corrupt record, ...)
    strings: dict[str, str] = {}
    tensors = ckpt_io.read_ckpt(path, progress=progress, skipped=non_tensor, strings=strings)
    return tensors, strings, "ckpt"


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
        if _KOHYA_RE.match(k) or _KOHYA_DOTTED_RE.match(k):
            votes["kohya"] += 1
        elif _WRAPPED_RE.match(k):  # a PEFT-wrapped UNet's own checkpoint: the LoRA in diffusers names
            votes["peft"] += 1
        elif _PEFT_RE.match(k):
            votes["peft"] += 1
        elif classify_ms_key(k, 2).kind == "lora":  # MindONE names, wrappers / 'ema.' included
            votes["ms"] += 1
    return votes.most_common(1)[0][0] if votes else "unknown"


# ---------------------------------------------------------------- MindONE checkpoint names

#: Where a model parameter's name starts, as segment tuples (SGM / gm names).
MS_ROOTS = (("model", "diffusion_model"), ("conditioner", "embedders"), ("cond_stage_model",),
            ("first_stage_model",))  # SGM (SDXL) and LDM (SD 1.x / 2.x: cond_stage_model) roots
#: gm's DiffusionEngineMultiGraph holds the UNet as stage1/stage2 and saves it as "model."
_STAGE_SEGMENTS = ("stage1", "stage2")
#: Name segments that mark optimizer state (MindSpore / MindONE optimizers, gradient buffers).
OPTIMIZER_SEGMENTS = frozenset({
    "adam_m", "adam_v", "moment1", "moment2", "moments", "accum", "accum_grad", "grad_accumulated_",
    "vhat", "mean_grad", "mean_square", "lamb_m", "lamb_v", "exp_avg", "exp_avg_sq", "optimizer"})
#: Non-parameter scalars/vectors a MindSpore training checkpoint carries next to the model.
TRAINING_STATE_NAMES = frozenset({
    "global_step", "learning_rate", "beta1_power", "beta2_power", "scale_sense", "loss_scale",
    "epoch_num", "step_num", "cur_step", "lora_rank", "updates", "accum_step",
    "current_iterator_step", "last_overflow_iterator_step"})
#: Wrapper attribute names MindSpore's auto-prefix puts in front of parameter names (evidence:
#: gm train.py ``remove_prefix="ldm_with_loss_grad.optimizer."``); dropped when reading.
WRAPPER_SEGMENTS = frozenset({"ldm_with_loss_grad"})
EMA_SEGMENT, SWAP_SEGMENT, BACKBONE_SEGMENT = "ema", "swap", "_backbone"

# kinds of ignored entries, as the summary names them
IGNORED_OPTIMIZER = "optimizer state"
IGNORED_SWAP = "EMA swap copies"
IGNORED_STATE = "training counters"
IGNORED_BASE = "base-model weights"
IGNORED_OTHER = "other non-LoRA entries"
IGNORED_STRINGS = "non-tensor entries"
IGNORED_EMA_LORA = "EMA LoRA tensors not chosen"
IGNORED_PLAIN_LORA = "non-EMA LoRA tensors not chosen"


@dataclass(frozen=True)
class MsKey:
    """What one key of a MindSpore checkpoint is.

    ``kind``: ``lora`` (``<module>.lora_A/B.weight``), ``bias`` (``<module>.bias`` / ``.beta``),
    ``base`` (any other model parameter), ``optimizer``, ``swap``, ``state`` (counters),
    ``unknown`` (LoRA-looking but not MindONE's naming) or ``other``.  ``name`` is the
    normalised parameter name (``_backbone`` segments, wrappers and ``ema.`` removed,
    ``stage1.``/``stage2.`` -> ``model.``) for the model kinds; ``ema`` says an ``ema``
    segment was removed.
    """

    kind: str
    name: str | None = None
    ema: bool = False


def _root_at(segs: list[str]) -> int | None:
    for i, seg in enumerate(segs):
        nxt = segs[i + 1] if i + 1 < len(segs) else None
        if seg in _STAGE_SEGMENTS and nxt == "diffusion_model":
            return i
        for root in MS_ROOTS:
            if tuple(segs[i:i + len(root)]) == root:
                return i
    return None


def classify_ms_key(key: str, numel: int) -> MsKey:
    """Classify one MindSpore checkpoint key (see :class:`MsKey`); pure function of the name."""
    segs = [s for s in key.split(".") if s != BACKBONE_SEGMENT]
    looks_lora = "lora" in key.lower()
    root = _root_at(segs)
    if root is None:  # not a model parameter
        if any(s in OPTIMIZER_SEGMENTS for s in segs):
            return MsKey("optimizer")
        if SWAP_SEGMENT in segs[:-1]:
            return MsKey("swap")
        if segs and segs[-1] in TRAINING_STATE_NAMES or numel <= 1:
            return MsKey("state")
        return MsKey("unknown" if looks_lora else "other")
    wrapper, rest = segs[:root], segs[root:]
    if any(s in OPTIMIZER_SEGMENTS for s in wrapper):
        return MsKey("optimizer")
    if SWAP_SEGMENT in wrapper:
        return MsKey("swap")
    ema = EMA_SEGMENT in wrapper
    if any(s not in WRAPPER_SEGMENTS and s != EMA_SEGMENT for s in wrapper):
        return MsKey("unknown" if looks_lora else "other")
    if rest[0] in _STAGE_SEGMENTS:
        rest = ["model", *rest[1:]]
    name = ".".join(rest)
    if _MS_RE.match(name):
        return MsKey("lora", name, ema)
    if rest[-1] in ("bias", "beta") and len(rest) > 1:
        return MsKey("bias", name, ema)
    if looks_lora:
        return MsKey("unknown", name, ema)
    return MsKey("base", name, ema)


@dataclass
class MsSelection:
    """The LoRA tensors chosen from a MindSpore checkpoint, by normalised name, and what was left."""

    lora: dict[str, tuple[str, Tensor]] = field(default_factory=dict)  # name -> (file key, tensor)
    biases: dict[str, tuple[str, Tensor]] = field(default_factory=dict)  # module -> (file key, tensor)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # kind -> file keys
    unknown: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def select_ms_tensors(path: Path, tensors: dict[str, Tensor], ema: bool | None) -> MsSelection:
    """Pick the LoRA set of a MindONE checkpoint: plain, or its ``ema.`` copies.

    ``ema=None``: the only set there is (a file with both is refused: pass ``--ema`` or
    ``--no-ema``); ``True``: the ``ema.`` set; ``False``: the plain set.  A ``.bias`` is a
    trained LoRA bias only in a file without base-model weights (MindONE's
    ``lora_state_dict(bias="lora_only")``); next to base weights it is a base weight.
    """
    out = MsSelection()
    by_set: dict[bool, dict[str, tuple[str, Tensor]]] = {False: {}, True: {}}
    bias_by_set: dict[bool, dict[str, tuple[str, Tensor]]] = {False: {}, True: {}}
    base_keys: list[str] = []

    def ignore(kind: str, key: str) -> None:
        out.ignored.setdefault(kind, []).append(key)

    for key, t in tensors.items():
        c = classify_ms_key(key, int(np.prod(t.shape)))
        if c.kind in ("lora", "bias"):
            target = (by_set if c.kind == "lora" else bias_by_set)[c.ema]
            name = c.name if c.kind == "lora" else c.name.rsplit(".", 1)[0]
            if name in target:
                raise CheckpointFormatError(
                    f"names the same parameter as '{target[name][0]}' once MindSpore wrapper names "
                    f"('_backbone', 'ema.', 'stage1.') are removed", path=path, key=key)
            target[name] = (key, t)
        elif c.kind == "base":
            base_keys.append(key)
        elif c.kind == "unknown":
            out.unknown.append(key)
        else:
            ignore({"optimizer": IGNORED_OPTIMIZER, "swap": IGNORED_SWAP, "state": IGNORED_STATE}
                   .get(c.kind, IGNORED_OTHER), key)

    plain, emas = by_set[False], by_set[True]
    if ema is None:
        if plain and emas:
            raise LoraParityError(
                f"holds both trained LoRA tensors ({len(plain)}) and their EMA copies ('ema.' names, "
                f"{len(emas)}); pass --ema to convert the EMA weights or --no-ema for the trained ones",
                path=path, key=next(iter(emas.values()))[0])
        use_ema = bool(emas)
    elif ema:
        if not emas:
            raise LoraParityError(
                "--ema: no 'ema.' LoRA tensors in this file (MindONE saves EMA LoRA weights to a separate "
                "*_lora_ema.ckpt under plain names: convert that file without --ema)", path=path)
        use_ema = True
    else:
        if not plain and emas:
            raise LoraParityError("--no-ema: this file holds only EMA LoRA tensors ('ema.' names); "
                                  "convert without --no-ema to use them", path=path,
                                  key=next(iter(emas.values()))[0])
        use_ema = False
    out.lora = by_set[use_ema]
    for key, _ in by_set[not use_ema].values():
        ignore(IGNORED_PLAIN_LORA if use_ema else IGNORED_EMA_LORA, key)
    if use_ema:
        out.notes.append(f"EMA weights: the {len(out.lora)} 'ema.' LoRA tensors"
                         + (" (--ema)" if ema else " (the file has no others)"))

    for key in base_keys:
        ignore(IGNORED_BASE, key)
    for is_ema, biases in bias_by_set.items():
        for mod, (key, t) in biases.items():
            if base_keys:  # a training / full checkpoint: biases are base weights like the rest
                ignore(IGNORED_BASE, key)
            elif is_ema != use_ema:
                ignore(IGNORED_PLAIN_LORA if use_ema else IGNORED_EMA_LORA, key)
            else:
                out.biases[mod] = (key, t)
    if out.biases:
        out.notes.append(f"{len(out.biases)} trained bias(es) saved with the LoRA (bias='lora_only')")
    return out


def _refuse_pt_bias(path: Path, key: str, fmt: str) -> None:
    """A bias in a PEFT / kohya LoRA: MindONE's LoRA layer has no term that holds it."""
    if fmt == "peft" and key.endswith(".lora_B.bias"):
        why = ("PEFT lora_B.bias (lora_bias=True) is added to the base layer's bias times alpha/r; "
               "MindONE's LoRA layer has no such term")
    elif fmt == "kohya" and key.endswith(".diff_b"):
        why = "a .diff_b is added to the base model's bias (ComfyUI); MindONE's LoRA layer has no such term"
    else:
        why = ("a trained bias in a PyTorch LoRA file (diffusers' load_lora_weights does not load it) "
               "has no MindONE LoRA equivalent")
    raise LoraParityError(f"{why}: cannot convert this LoRA exactly", path=path, key=key)


def parse(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], fmt: str, *,
          ema: bool | None = None, non_tensor: list[str] | None = None) -> NamedHalves:
    """Group a file's keys into modules; classify the rest as skipped or unknown.

    ``ema`` chooses between the plain and the ``ema.`` LoRA tensors of a MindONE
    checkpoint (see :func:`select_ms_tensors`); for PEFT / kohya files only ``True`` matters
    (refused: they have no EMA copies).
    """
    space = {"ms": "sgm", "peft": "diffusers", "kohya": "kohya"}[fmt]
    h = NamedHalves(path=path, space=space, fmt=fmt, modules={}, keys={})
    if fmt == "ms":
        h = _parse_ms(h, tensors, ema)
        if non_tensor:  # append_dict strings: never model data
            h.ignored.setdefault(IGNORED_STRINGS, []).extend(non_tensor)
            h.skipped.extend(non_tensor)
        return h
    if ema:
        raise LoraParityError(f"--ema: a {fmt} file has no EMA copies (only MindONE checkpoints do)", path=path)
    regex = {"peft": _PEFT_RE, "kohya": _KOHYA_RE}[fmt]
    bias_re = {"peft": _PEFT_BIAS_RE, "kohya": _KOHYA_BIAS_RE}[fmt]
    if fmt == "kohya":  # training record and model spec ride along (as strings in a .ckpt)
        h.metadata = {k: v for k, v in metadata.items() if k.startswith(KOHYA_META_PREFIXES)}
    adapters: dict[str, int] = {}
    wrapped_comp = "unet"
    if fmt == "peft":
        adapters = Counter(m.group("adapter") for m in map(_WRAPPED_RE.match, tensors) if m)
        if len(adapters) > 1:
            raise LoraParityError(f"a PEFT-wrapped model checkpoint holding {len(adapters)} adapters "
                                  f"({', '.join(sorted(adapters))}); extract one with diffusers / mindone's "
                                  f"get_peft_model_state_dict(model, adapter_name=...)", path=path)
    for key, t in tensors.items():
        m = regex.match(_undot_kohya(key) if fmt == "kohya" else key)
        if m is None and adapters:
            w = _WRAPPED_RE.match(key)
            if w is not None:
                comp = "transformer" if w.group("mod").startswith(_TRANSFORMER_ROOTS) else "unet"
                wrapped_comp = comp
                mod = f"{comp}.{w.group('mod')}"
                h.modules.setdefault(mod, {})[w.group("half")] = t
                h.keys.setdefault(mod, {})[w.group("half")] = key
                continue
            if ".lora_" in key:  # LoRA-looking but not the wrapped layout: never dropped silently
                h.unknown.append(key)
                continue
            h.ignored.setdefault(IGNORED_BASE, []).append(key)  # the UNet's own weights, base_layer ones too
            h.skipped.append(key)
            continue
        if m is None:
            if bias_re.match(key):
                _refuse_pt_bias(path, key, fmt)
            if key.startswith(OPTIMIZER_PREFIXES) or "lora" not in key.lower():
                h.skipped.append(key)
            else:
                h.unknown.append(key)
            continue
        mod = m.group("mod")
        if fmt == "peft":
            mod = peft_module(m.group("comp"), mod)
        if m.groupdict().get("alpha"):
            if t.shape not in ((), (1,)):
                raise CheckpointFormatError(f"alpha must be a scalar, got shape {list(t.shape)}", path=path, key=key)
            h.alpha_overrides[mod] = float(t.to_float().reshape(-1)[0])
            continue
        half = m.group("half") or m.groupdict().get("old")
        half = {"down": "A", "up": "B"}.get(half, half)
        h.modules.setdefault(mod, {})[half] = t
        h.keys.setdefault(mod, {})[half] = key
    if fmt == "kohya" and bfl.is_bfl(h.modules):  # sd-scripts' Flux LoRA: BFL names, fused q/k/v
        bfl.split_bfl(h)
    for mod in list(h.alpha_overrides):
        if mod not in h.modules:
            h.unknown.append(f"{mod}.alpha")
    if fmt == "peft":
        h.default_alpha = _peft_alphas(path, metadata, h)
    based = set(h.ignored.get(IGNORED_BASE, ()))
    for key in h.skipped:
        if key not in based:
            h.ignored.setdefault(IGNORED_OPTIMIZER if key.startswith(OPTIMIZER_PREFIXES) else IGNORED_OTHER,
                                 []).append(key)
    if adapters:
        h.source_kind = WRAPPED_MODEL
        (name, n), = adapters.items()
        what = "UNet" if wrapped_comp == "unet" else "transformer"
        h.notes.append(f"the LoRA of adapter '{name}' from a whole PEFT-wrapped {what} checkpoint ({n} tensors; "
                       f"{len(based)} {what} weights left out); it stores no alpha: alpha = rank, as mindone's "
                       f"trainers set lora_alpha (pass --alpha if yours differed)")
    return h


def peft_module(comp: str, mod: str) -> str:
    """A PEFT module name (file key or adapter-metadata pattern) as the key map spells it.  diffusers with
    transformers 5 writes a plain ``CLIPTextModel``'s modules without "text_model.", and our own metadata names
    CLIP modules without it (it fits both module trees); T5 encoders (``encoder.block.``) have no such prefix."""
    if comp.startswith("text_encoder") and mod.startswith("encoder.layers."):
        mod = "text_model." + mod
    return f"{comp}.{mod}"


def _undot_kohya(key: str) -> str:
    """MindONE's sd-scripts port's dotted ``.ckpt`` names -> sd-scripts' own (``lora_unet_a_b.lora_down.weight``)."""
    m = _KOHYA_DOTTED_RE.match(key)
    return key if m is None else f"{m.group('prefix')}_{m.group('path').replace('.', '_')}.{m.group('tail')}"


def _parse_ms(h: NamedHalves, tensors: dict[str, Tensor], ema: bool | None) -> NamedHalves:
    sel = select_ms_tensors(h.path, tensors, ema)
    spellings = set()
    for name, (key, t) in sel.lora.items():
        m = _MS_RE.match(name)
        mod, half = m.group("mod"), m.group("half")
        spellings.add("ldm" if half in ("down", "up") else "gm")
        half = {"down": "A", "up": "B"}.get(half, half)
        if half in h.modules.get(mod, {}):
            raise CheckpointFormatError(f"holds both lora_A/B and lora_down/up tensors for module {mod}",
                                        path=h.path, key=key)
        h.modules.setdefault(mod, {})[half] = t
        h.keys.setdefault(mod, {})[half] = key
    if "ldm" in spellings:
        _check_lora_rank(h, tensors)
    for mod, (key, t) in sel.biases.items():
        h.biases[mod] = t
        h.bias_keys[mod] = key
    h.ignored = sel.ignored
    h.skipped = [k for keys in sel.ignored.values() for k in keys]
    h.unknown = sel.unknown
    h.notes = sel.notes
    return h


def _check_lora_rank(h: NamedHalves, tensors: dict[str, Tensor]) -> None:
    """MindONE's LDM LoRA records its one rank (``append_dict={"lora_rank": r}``) and its loader builds every
    ``LoRADenseLayer`` at that rank: a file whose tensors disagree would not load there."""
    t = tensors.get(LDM_RANK_KEY)
    if t is None:
        return
    if t.shape not in ((), (1,)) or t.dtype not in ("I64", "I32", "I16", "I8", "U8"):
        raise CheckpointFormatError(f"'{LDM_RANK_KEY}' must be an integer scalar, got {t.dtype}{list(t.shape)}",
                                    path=h.path, key=LDM_RANK_KEY)
    rank = int(t.data.reshape(-1)[0])
    for mod, parts in h.modules.items():
        if "A" in parts and parts["A"].shape and parts["A"].shape[0] != rank:
            raise CheckpointFormatError(f"rank {parts['A'].shape[0]} differs from the file's {LDM_RANK_KEY} {rank} "
                                        f"(MindONE's loader builds every LoRA layer at that rank)",
                                        path=h.path, key=h.keys[mod]["A"])


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
    for comp in PEFT_COMPONENTS:
        if f"{comp}.lora_alpha" in meta:
            out[comp] = float(meta[f"{comp}.lora_alpha"])
        for mod, a in (meta.get(f"{comp}.alpha_pattern") or {}).items():
            h.alpha_overrides[peft_module(comp, mod)] = float(a)
    return out


# ---------------------------------------------------------------- writers

def bias_refusal(fmt: str) -> str:
    """Why a trained bias (MindONE ``bias="lora_only"``: the layer's whole bias) cannot be written as ``fmt``.

    diffusers' SDXL ``load_lora_weights`` refuses any key without 'lora' ("Invalid LoRA
    checkpoint"), so a base ``.bias`` / ``.base_layer.bias`` key cannot ride along; PEFT's
    ``lora_B.bias`` (``lora_bias=True``) and ComfyUI's ``.diff_b`` are *added* to the base bias
    (PEFT: times alpha/r), and sd-scripts' LoRA has no bias at all.  Writing the MindONE
    bias as such an addition needs the base model's bias, which a LoRA file does not have.
    """
    target = ("PEFT's lora_B.bias is added to the base bias times alpha/r and diffusers refuses other "
              "bias keys" if fmt == "peft" else
              "kohya LoRAs have no bias (sd-scripts), ComfyUI's .diff_b is added to the base bias")
    return (f"trained bias (MindONE bias='lora_only', the layer's whole bias) cannot be written as {fmt}: "
            f"{target}, so it needs the base model; use --format ms to keep it")


#: What MindONE's LDM LoRA (SD 1.x / 2.x ``LoRADenseLayer``) can hold: ``inject_trainable_lora`` replaces the
#: UNet CrossAttention's to_q/to_k/to_v/to_out[0], ``inject_trainable_lora_to_textencoder`` the text
#: encoder's fused in_proj and out_proj; its loader keeps only those names (a LoRA elsewhere loads nothing)
LDM_LORA_SUFFIXES = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
                     ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0",
                     ".attn.attn.in_proj", ".attn.attn.out_proj")


def ms_style(lora: LoraSet) -> str:
    """How a MindONE checkpoint of this family spells its LoRA: "gm" (SDXL: lora_A / lora_B, a lora_alpha at
    inference) or "ldm" (SD 1.x / 2.x: lora_down / lora_up, one lora_rank, a --lora_scale at inference)."""
    return "ldm" if lora.layout.family in ("sd1", "sd2") else "gm"


#: why an SD3 / Flux LoRA has no MindSpore-only file to write
NO_MS_TRANSFORMER = ("MindONE has no .ckpt LoRA format for {family}: mindone.diffusers trains and saves SD3 / Flux "
                     "LoRAs as PEFT safetensors (diffusers names), so write --format peft or kohya as .safetensors")


def check_writable(lora: LoraSet, fmt: str, src: Path | None = None, dst: Path | None = None) -> None:
    """Refuse, naming the source key, what ``fmt`` cannot hold (before anything is written)."""
    if lora.layout.is_transformer and (fmt == "ms" or (dst is not None and dst.suffix.lower() == ".ckpt")):
        raise LoraParityError(NO_MS_TRANSFORMER.format(family=lora.layout.family.upper()),
                              path=dst if fmt != "ms" and dst is not None else src)
    if fmt != "ms":
        biased = lora.biased()
        if biased:
            sgm = biased[0].module.sgm
            more = f" ({len(biased)} biases)" if len(biased) > 1 else ""
            raise LoraParityError(bias_refusal(fmt) + more, path=src,
                                  key=lora.bias_keys.get(sgm, f"{sgm}.bias"))
    elif ms_style(lora) == "ldm":
        _check_ldm_writable(lora, src)


def _check_ldm_writable(lora: LoraSet, src: Path | None) -> None:
    """MindONE's LDM LoRA: attention modules only, one rank, one scale, no trained bias."""
    km = lora.keymap

    def key_of(p: LoraPair) -> str:  # the module as the source file names it
        if lora.source_format == "peft":
            return p.module.diffusers[0]
        if lora.source_format == "kohya":
            return kohya_name(p.module, 0, te_prefixes=km.te_kohya, unet_style=km.kohya_unet_style)
        return p.module.sgm

    for p in lora.ordered():
        if not p.module.sgm.endswith(LDM_LORA_SUFFIXES):
            n = sum(not q.module.sgm.endswith(LDM_LORA_SUFFIXES) for q in lora.pairs.values())
            raise LoraParityError(
                f"MindONE's SD 1.x / 2.x LoRA (LoRADenseLayer) adapts only attention q/k/v/out (UNet) and "
                f"in_proj/out_proj (text encoder); {n} module(s) of this LoRA are elsewhere and would load "
                f"nothing there, e.g. {p.module.sgm} (keep this LoRA as peft / kohya)", path=src, key=key_of(p))
        if p.bias is not None:
            raise LoraParityError("MindONE's LoRADenseLayer trains no bias", path=src, key=f"{p.module.sgm}.bias")
    if len(lora.ranks()) > 1:
        fused = [p for p in lora.ordered() if p.part_ranks]
        why = (f"; {len(fused)} text-encoder in_proj LoRA(s) fused from separately trained q/k/v have rank "
               f"{fused[0].rank}" if fused else "")
        raise LoraParityError(f"modules have ranks {sorted(lora.ranks())}{why}; MindONE's SD 1.x / 2.x loader builds "
                              f"every LoRA layer at the one lora_rank its checkpoint records", path=src)
    if len({p.scale for p in lora.pairs.values()}) > 1:
        raise LoraParityError(f"modules have different scales alpha/rank {sorted({p.scale for p in lora.pairs.values()})}; "
                              f"MindONE's SD 1.x / 2.x LoRA has one --lora_scale for all layers", path=src)


def pair_tensors(p: LoraPair, fmt: str, te_kohya: dict[str, str], unet_style: str = "sgm", *,
                 ms_spelling: str = "gm", dotted: bool = False) -> list[tuple[str, Tensor, str]]:
    """(key, tensor, role) stored for one module in ``fmt``; role is 'A', 'B', 'alpha' or 'bias'.

    ``ms_spelling``: "gm" (lora_A / lora_B) or "ldm" (lora_down / lora_up, see :func:`ms_style`);
    ``dotted``: kohya names as MindONE's sd-scripts port writes them into a ``.ckpt``."""
    if fmt == "ms":
        down, up = ("lora_down", "lora_up") if ms_spelling == "ldm" else ("lora_A", "lora_B")
        out = [(f"{p.module.sgm}.{down}.weight", p.A, "A"), (f"{p.module.sgm}.{up}.weight", p.B, "B")]
        if p.bias is not None:  # as MindONE's lora_state_dict(bias="lora_only") names it
            out.append((f"{p.module.sgm}.bias", p.bias, "bias"))
        return out
    if p.bias is not None:
        raise LoraParityError(bias_refusal(fmt), key=f"{p.module.sgm}.bias")
    n = len(p.module.diffusers)
    rows = p.B.shape[0] // n
    # a block-diagonal fused LoRA (q/k/v trained apart) goes back to its parts; any other fused LoRA
    # shares its lora_A between q, k and v, with lora_B split by rows
    parts = split_parts(p) or [(p.A, p.B if n == 1 else Tensor(p.B.dtype, p.B.data[i * rows:(i + 1) * rows]),
                                p.alpha) for i in range(n)]
    out = []
    namer = kohya_dotted_name if dotted else kohya_name
    for i, (dif, (a, b, alpha)) in enumerate(zip(p.module.diffusers, parts)):
        if fmt == "peft":
            out += [(f"{dif}.lora_A.weight", a, "A"), (f"{dif}.lora_B.weight", b, "B")]
        else:
            kn = namer(p.module, i, te_prefixes=te_kohya, unet_style=unet_style)
            out += [(f"{kn}.lora_down.weight", a, "A"), (f"{kn}.lora_up.weight", b, "B"),
                    (f"{kn}.alpha", kohya_alpha(alpha, a.dtype), "alpha")]
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


def tensors_for(lora: LoraSet, fmt: str, *, dotted: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The exact key -> tensor dict (and header metadata / .ckpt strings) a format stores."""
    km = lora.keymap
    spelling = ms_style(lora)
    out: dict[str, Tensor] = {}
    for p in lora.ordered():
        for k, t, _ in pair_tensors(p, fmt, km.te_kohya, km.kohya_unet_style, ms_spelling=spelling, dotted=dotted):
            if k in out:  # a key map naming two modules alike would silently lose one: never write that
                raise LoraParityError(f"two modules would be written under one {fmt} name (key-map fault)", key=k)
            out[k] = t
    meta: dict[str, str] = {}
    if fmt == "ms" and spelling == "ldm" and len(lora.ranks()) == 1:
        # as MindONE's EvalSaveCallback appends it (save_checkpoint writes a Python int as a 0-d Int64)
        out[LDM_RANK_KEY] = Tensor("I64", np.array(next(iter(lora.ranks())), dtype=np.int64).reshape(()))
    if fmt == "peft":
        meta[ADAPTER_METADATA_KEY] = json.dumps(_adapter_metadata(lora), sort_keys=True, allow_nan=False)
        meta["format"] = "pt"
    if fmt == "kohya":
        meta.update(kohya_metadata(lora, out))
    if fmt != "ms":
        meta[OUR_METADATA_KEY] = json.dumps({"layout": lora.layout.name, "source_format": lora.source_format},
                                            allow_nan=False)
    return out, meta


def kohya_metadata(lora: LoraSet, tensors: dict[str, Tensor]) -> dict[str, str]:
    """sd-scripts' header: what a kohya source recorded (``ss_*``, ``modelspec.*``), with the fields a loader
    reads to describe the network set from the tensors written: the most common rank and alpha over the
    written modules (a recorded value is kept when it says the same number, e.g. sd-scripts' "2.0").
    Values are strings, as sd-scripts writes them."""
    meta = dict(lora.metadata)
    ranks = Counter(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    alphas = Counter(float(t.to_float().reshape(-1)[0]) for k, t in tensors.items() if k.endswith(".alpha"))
    for key, counter, text in (("ss_network_dim", ranks, str), ("ss_network_alpha", alphas, lambda a: f"{a:g}")):
        if not counter:
            continue
        value = counter.most_common(1)[0][0]
        try:
            same = float(meta.get(key, "nan")) == float(value)
        except ValueError:
            same = False
        if not same:
            meta[key] = text(value)
    if lora.layout.is_transformer:
        # names are OneTrainer's / ComfyUI's (lora_transformer_), not sd-scripts' SD3 / Flux networks (whose Flux
        # LoRA uses BFL names): claim no sd-scripts network module or base-model version
        return meta
    meta["ss_network_module"] = "networks.lora"
    meta["ss_base_model_version"] = meta.get("ss_base_model_version") or KOHYA_BASE_VERSION[lora.layout.family]
    meta["ss_v2"] = str(lora.layout.family == "sd2")
    return meta


def _adapter_metadata(lora: LoraSet) -> dict:
    """diffusers' per-component LoraConfig kwargs: most common r/alpha plus exact patterns."""
    per_comp: dict[str, list[tuple[str, int, float]]] = {}
    for p in lora.ordered():
        parts = split_parts(p)
        for i, dif in enumerate(p.module.diffusers):
            comp, mod = dif.split(".", 1)
            # transformers 5 flattens CLIPTextModel (no "text_model."); PEFT matches target
            # names as suffixes, so the unprefixed name fits both old and new module trees
            mod = mod.removeprefix("text_model.")
            rank, alpha = (parts[i][0].shape[0], parts[i][2]) if parts else (p.rank, p.alpha)
            per_comp.setdefault(comp, []).append((mod, rank, alpha))
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
    suffix = path.suffix.lower()
    if lora.layout.is_transformer:  # no MindONE .ckpt for SD3 / Flux, whoever calls
        check_writable(lora, fmt, dst=path)
    tensors, meta = tensors_for(lora, fmt, dotted=fmt == "kohya" and suffix == ".ckpt")
    if fmt == "kohya" and suffix == ".ckpt":  # MindONE's sd-scripts port: dotted names, header as str records
        ckpt_io.write_ckpt(path, tensors, strings={k: v for k, v in meta.items() if k != OUR_METADATA_KEY})
        return path.stat().st_size, len(tensors)
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
