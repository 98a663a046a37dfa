"""What the shipped suite computes on the user's LoRA, one stage at a time.

Each stage (read, finiteness, completeness, layout, resolution, strict mapping) is computed once
and cached with its error; the test that owns a stage fails with that error, every test that
needs the stage is skipped naming that test, so one fault fails one named test.

Nothing here needs base weights: diffusers' ``load_lora_weights`` runs on a real-size pipeline of the
LoRA's family (SDXL, SD 1.x / 2.x, SD3, Flux) whose modules are built on the meta device and then given
zero-stride tensors of their real shapes (:func:`hollow_pipeline`: real module tree and shapes, about no
memory), so PEFT attaches real LoRA layers to real-shaped modules.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_parity.convert import formats
from lora_parity.convert.converter import ConvertOptions, convert
from lora_parity.errors import KeyMapError, LoraParityError
from lora_parity.convert.keymap import KeyMap, ModuleEntry, keymap_for
from lora_parity.convert.detect import family_from_keys
from lora_parity.convert.layout import PRESETS, TRANSFORMER_FAMILIES, ModelLayout, load_layout
from lora_parity.convert.lora_set import LoraSet, NamedHalves, _fits, choose_layout, resolve

#: the test that reports each stage's failure (dependent tests are skipped naming it)
OWNERS = {
    "read": "test_file_parses",
    "finite": "test_no_nan_or_inf",
    "complete": "test_not_cut_short",
    "layout": "test_layout_detected",
    "resolved": "test_tensors_fit_the_layout",
    "strict": "test_every_key_maps",
}


#: what each stage builds on
DEPENDS = {"read": (), "finite": ("read",), "complete": ("read",), "layout": ("read",),
           "resolved": ("read", "finite", "complete", "layout"), "strict": ("resolved",)}


class LoraCoverageWarning(UserWarning):
    """The LoRA covers less of the model than MindONE trains by default."""


class LoraContentWarning(UserWarning):
    """Something in the LoRA looks unusual but does not make it wrong (e.g. some lora_B still zero)."""


class LoraCheckScopeWarning(UserWarning):
    """A check could only judge part of the LoRA (what a reader takes); the rest is named, never passed silently."""


class StageFailed(Exception):
    """A stage this test needs failed; ``owner`` is the named test that reports it."""

    def __init__(self, stage: str, message: str):
        self.stage, self.owner = stage, OWNERS[stage]
        super().__init__(f"{message} (see {self.owner})")


@dataclass
class FileRead:
    tensors: dict
    metadata: dict
    container: str
    fmt: str
    halves: NamedHalves
    size: int
    non_tensor: list[str] = field(default_factory=list)


def lookup(km: KeyMap, space: str, name: str) -> ModuleEntry | None:
    """The key-map entry a module name in ``space`` (sgm / diffusers / kohya) denotes, LoRA-able only."""
    if space == "sgm":
        e = km.by_sgm.get(name)
    else:
        hit = (km.by_diffusers if space == "diffusers" else km.by_kohya).get(name)
        e = hit[0] if hit else None
    return e if e is not None and e.lora_able else None


def role(entry: ModuleEntry) -> tuple[str, str]:
    """What a module is inside its repeated unit, without block indices: ``attn1.to_q``,
    ``in_layers.2``, ``self_attn.q_proj``, ``attn.in_proj`` (the name after its last index).  An SD3 / Flux
    transformer module: its path inside its block (``attn.to_q``, ``ff.net.0.proj``; a Flux double block's and a
    single block's ``attn.to_q`` are one role), or its whole path at the top level."""
    if entry.component == "transformer":
        path = entry.sgm.split(".", 1)[1]
        return entry.component, path[len(entry.block) + 1:] if path.startswith(entry.block + ".") else path
    parts = re.split(r"\.\d+\.", entry.sgm)
    return entry.component, parts[-1]


#: SD3 / Flux transformer columns of the coverage table: (name fragment, column), the first that matches; a
#: block's other Linears (norm modulations, a single block's proj_mlp / proj_out) are "other"
_TRANSFORMER_GROUPS = ((".attn.add_", "attn (text)"), (".attn.to_add_out", "attn (text)"), (".attn.", "attn"),
                       (".attn2.", "attn"), (".ff_context.", "ff (text)"), (".ff.", "ff"))


def group(entry: ModuleEntry) -> str:
    """Column of the coverage table."""
    s = entry.sgm
    if entry.component == "transformer":
        if "blocks." not in s:
            return "top level"
        return next((name for key, name in _TRANSFORMER_GROUPS if key in s), "other")
    if entry.component != "unet":
        return "text attention" if (".self_attn." in s or ".attn." in s or ".SelfAttention." in s) else "text mlp"
    for key, name in ((".attn1.", "attn1 (self)"), (".attn2.", "attn2 (cross)"), (".ff.", "ff"),
                      (".proj_in", "proj in/out"), (".proj_out", "proj in/out")):
        if key in s:
            return name
    if any(k in s for k in ("in_layers", "out_layers", "emb_layers", "skip_connection")):
        return "resnet"
    return "other"


class UserLora:
    """The user's LoRA file, inspected stage by stage (results and errors cached)."""

    def __init__(self, path: Path, *, layout: str | None = None, alpha: float | None = None,
                 ema: bool | None = None, lora_scale: float | None = None):
        self.path = Path(path)
        self.layout_spec = layout
        self.alpha = alpha
        self.ema = ema
        self.lora_scale = lora_scale  # MindONE SD 1.x / 2.x LoRA: its --lora_scale (alpha = scale x rank)
        self._cache: dict[str, tuple[object, Exception | None]] = {}

    def _stage(self, name: str, fn):
        if name not in self._cache:
            try:
                self._cache[name] = (fn(), None)
            except (LoraParityError, StageFailed) as exc:
                self._cache[name] = (None, exc)
        value, exc = self._cache[name]
        if exc is not None:
            raise exc
        return value

    def require(self, *stages: str) -> None:
        """Raise :class:`StageFailed` for the first failed stage among ``stages`` and what they build on."""
        for stage in stages:
            self.require(*DEPENDS[stage])
            run = {"read": self.read, "finite": self.nonfinite, "complete": self.half_modules,
                   "layout": self.layout, "resolved": self.resolved, "strict": self.strict}[stage]
            try:
                value = run()
            except StageFailed:
                raise
            except LoraParityError as exc:
                raise StageFailed(stage, str(exc)) from None
            if stage == "finite" and value:
                raise StageFailed(stage, f"NaN/Inf in {', '.join(value[:3])}")
            if stage == "complete" and value:
                raise StageFailed(stage, f"the file looks partial: {value[0]}")

    # ------------------------------------------------------------ stages

    def read(self) -> FileRead:
        def run():
            non_tensor: list[str] = []
            tensors, meta, container = formats.read_tensors(self.path, non_tensor=non_tensor)
            fmt = formats.detect_format(tensors)
            if fmt == "unknown":
                raise LoraParityError(f"no LoRA tensors recognised among {len(tensors)} keys (expected MindONE "
                                      f"'.lora_A.weight', PEFT 'unet.' or kohya 'lora_unet_' names)", path=self.path)
            halves = formats.parse(self.path, tensors, meta, fmt, ema=self.ema, non_tensor=non_tensor)
            return FileRead(tensors, meta, container, fmt, halves, self.path.stat().st_size, non_tensor)
        return self._stage("read", run)

    def nonfinite(self) -> list[str]:
        """Keys of LoRA tensors (and biases, alphas) holding NaN or Inf."""
        def run():
            h = self.read().halves
            bad = [h.keys[m][half] for m, parts in h.modules.items() for half in ("A", "B")
                   if half in parts and not parts[half].is_finite()]
            bad += [h.bias_keys[m] for m, t in h.biases.items() if not t.is_finite()]
            bad += [f"{m}.alpha" for m, a in h.alpha_overrides.items() if not np.isfinite(a)]
            return bad
        return self._stage("finite", run)

    def half_modules(self) -> list[str]:
        """One line per module with only one of its two halves."""
        def run():
            h = self.read().halves
            out = []
            for m, parts in h.modules.items():
                for have, miss in (("A", "B"), ("B", "A")):
                    if have in parts and miss not in parts:
                        out.append(f"{h.keys[m][have]} has no lora_{miss}")
            return out
        return self._stage("complete", run)

    def layout(self) -> tuple[ModelLayout, str, int]:
        """(layout, note, modules it was chosen from): ``--lora-layout`` or detected from the complete
        modules whose names some preset knows (the others are :meth:`strict`'s to report)."""
        def run():
            h = self.read().halves
            if self.layout_spec is not None:
                layout = load_layout(self.layout_spec)
                return layout, f"layout '{layout.name}' (given: --lora-layout {self.layout_spec})", len(h.modules)
            known = {m: p for m, p in h.modules.items() if "A" in p and "B" in p
                     and any(lookup(keymap_for(L), h.space, m) for L in PRESETS.values())}
            if not known:
                raise KeyMapError(f"no LoRA module name belongs to a known layout ({', '.join(PRESETS)}); "
                                  "pass --lora-layout with the model's config.json or pipeline folder", path=self.path)
            sub = dataclasses.replace(h, modules=known, keys={m: h.keys[m] for m in known})
            try:
                layout, note = choose_layout(sub, None)
            except KeyMapError as exc:
                layout, note = self._nearly_fitting_layout(sub, exc)
            if len(known) < len(h.modules):
                note += f", from the {len(known)} of {len(h.modules)} modules whose names a layout knows"
            return layout, note, len(known)
        return self._stage("layout", run)

    #: the share of a file's known modules that must fit a preset by name and shape for the suite to take it when
    #: some do not: one bad tensor among many is the file's fault, for test_tensors_fit_the_layout to name by key
    NEARLY_FITS = 0.9

    def _nearly_fitting_layout(self, sub: NamedHalves, exc: KeyMapError) -> tuple[ModelLayout, str]:
        """The one preset (of the family the names say) that at least :data:`NEARLY_FITS` of the modules fit by
        name and shape, strictly best; else ``exc`` (the converter's own detection error) stands.

        The converter refuses to guess; the suite only needs a layout to check the file against, and with one
        rank-mismatched or cut tensor among hundreds, "fits no built-in size" would hide which key is wrong."""
        family = family_from_keys(sub.modules)
        scores = {name: _fits(keymap_for(p), sub)[0] for name, p in PRESETS.items()
                  if (p.family in TRANSFORMER_FAMILIES) == (family is not None)
                  and family in (None, "transformer", p.family)}
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        if not ranked:
            raise exc
        best, ok = ranked[0]
        total = len(sub.modules)
        if ok < self.NEARLY_FITS * total or (len(ranked) > 1 and ranked[1][1] == ok):
            raise exc
        return PRESETS[best], (f"layout '{best}' (detected: {ok} of {total} modules fit it by name and shape; "
                               f"test_tensors_fit_the_layout names the others)")

    def resolved(self) -> LoraSet:
        """Names, shapes, ranks and dtypes checked against the layout; unmapped keys collected, not fatal."""
        def run():
            self.require(*DEPENDS["resolved"])
            return resolve(self.read().halves, self.layout()[0], alpha=self.alpha, strict=False,
                           scale=self.lora_scale)
        return self._stage("resolved", run)

    def strict(self) -> LoraSet:
        """The resolved LoRA, only if every LoRA key maps (what the converter requires)."""
        def run():
            self.require(*DEPENDS["strict"])
            lora = self.resolved()
            if lora.unmapped:
                shown = ", ".join(lora.unmapped[:5]) + (f" and {len(lora.unmapped) - 5} more"
                                                        if len(lora.unmapped) > 5 else "")
                raise KeyMapError(f"{len(lora.unmapped)} LoRA key(s) do not map to layout "
                                  f"'{lora.layout.name}': {shown}", path=self.path)
            return lora
        return self._stage("strict", run)

    # ------------------------------------------------------------ derived checks

    def file_order(self, layout: ModelLayout) -> list[ModuleEntry]:
        """The layout's entries of the file's complete modules, in the order the file holds them."""
        h = self.read().halves
        km = keymap_for(layout)
        seen, out = set(), []
        for m, parts in h.modules.items():
            e = lookup(km, h.space, m) if ("A" in parts and "B" in parts) else None
            if e is not None and e.sgm not in seen:
                seen.add(e.sgm)
                out.append(e)
        return out

    def cut_inside_block(self) -> str | None:
        """Why the file looks cut short at a record boundary, or None.

        The file's own pattern (which module roles it trains, e.g. ``attn1.to_q``) extended to
        every block of the layout gives the modules it should hold; if the missing ones all lie
        in the block where the file ends or after it, and that block is itself incomplete, the
        file most likely ends where a write or copy stopped: a MindSpore ``.ckpt`` is a sequence
        of records and parses without error when cut between two of them.
        """
        layout = self.layout()[0]
        km = keymap_for(layout)
        present = self.file_order(layout)
        if not present:
            return None
        roles = {role(e) for e in present}
        have = {e.sgm for e in present}
        missing = [e for e in km.lora_entries() if role(e) in roles and e.sgm not in have]
        if not missing:
            return None
        last = present[-1]
        blocks = list(dict.fromkeys(e.block for e in km.lora_entries(last.component)))
        at = blocks.index(last.block)
        tail = all(e.component == last.component and blocks.index(e.block) >= at for e in missing)
        inside = [e for e in missing if e.block == last.block]
        if tail and inside:
            return (f"the file looks partial: it ends inside block {last.block} (last module {last.sgm}) and "
                    f"{len(missing)} modules of its own pattern are missing from there on, e.g. {inside[0].sgm} "
                    f"(a MindSpore .ckpt cut between two records parses without error; compare the file size "
                    f"with the original: {self.read().size:,} bytes)")
        return None

    def coverage(self) -> tuple[list[str], dict]:
        """A table of LoRA modules per block and kind (present / available) and the comparison with
        what MindONE trains by default for this layout (:func:`mindone_default`)."""
        lora = self.resolved()
        km = lora.keymap
        present = set(lora.pairs)
        groups = list(dict.fromkeys(group(e) for e in km.lora_entries()))
        table: dict[str, Counter] = {}
        avail: dict[str, Counter] = {}
        for e in km.lora_entries():
            row = table_row(e)
            avail.setdefault(row, Counter())[group(e)] += 1
            if e.sgm in present:
                table.setdefault(row, Counter())[group(e)] += 1
        used = [g for g in groups if any(c[g] for c in table.values())]
        width = max([len(b) for b in table] + [5])
        lines = [f"{'block':<{width}}  " + "  ".join(f"{g:>14}" for g in used)]
        for block in avail:
            if block in table:
                cells = [f"{table[block][g]}/{avail[block][g]}" if avail[block][g] else "-" for g in used]
                lines.append(f"{block:<{width}}  " + "  ".join(f"{c:>14}" for c in cells))
        default = mindone_default(km)
        lacking = [e for e in default if e.sgm not in present]
        extra = sorted(present - {e.sgm for e in default})
        rows = list(avail)
        info = {"modules": len(present), "mindone_default": len(default), "mindone_default_covered":
                len(default) - len(lacking), "lacking_blocks": sorted({table_row(e) for e in lacking},
                                                                       key=rows.index),
                "beyond_default": len(extra), "mindone_default_is": MINDONE_DEFAULT_WHAT.get(
                    lora.layout.family, MINDONE_DEFAULT_WHAT["unet"])}
        return lines, info


def table_row(entry: ModuleEntry) -> str:
    """Row of the coverage table: a UNet's or transformer's block, a text encoder as one row."""
    return entry.block if entry.component in ("unet", "transformer") else entry.component


#: What mindone.diffusers' LoRA trainers adapt when no module list is given, as PEFT ``target_modules``
#: (``examples/diffusers/dreambooth/train_dreambooth_lora_sd3.py``: ``["to_k", "to_q", "to_v", "to_out.0"]``;
#: ``train_dreambooth_lora_flux.py`` without ``--lora_layers``: both streams' attention projections and the double
#: blocks' feed-forwards, which also hits the single blocks' ``attn.to_q/k/v``).  PEFT matches a target against a
#: module name exactly or as its last dotted segments (``name.endswith("." + target)``); so does
#: :func:`mindone_default`.  The UNet families' default (SDXL gm, SD 1.x / 2.x) is every UNet attention's q/k/v/out.
TRAINER_TARGETS: dict[str, tuple[str, ...]] = {
    "sd3": ("to_k", "to_q", "to_v", "to_out.0"),
    "flux": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"),
}
#: the same, in words, for the summary and the warning
MINDONE_DEFAULT_WHAT = {
    "unet": "UNet attention q/k/v/out",
    "sd3": "transformer attention to_q/k/v/to_out.0",
    "flux": "double blocks' attention + feed-forwards, single blocks' attention",
}


def mindone_default(km: KeyMap) -> list[ModuleEntry]:
    """The modules MindONE's trainer for this family adapts by default (:data:`TRAINER_TARGETS`), in key-map order."""
    targets = TRAINER_TARGETS.get(km.layout.family)
    if targets is None:
        return km.attention_entries()
    name = lambda e: e.diffusers[0][len("transformer."):]  # noqa: E731 - the module's path in the transformer
    return [e for e in km.lora_entries("transformer")
            if any(name(e) == t or name(e).endswith("." + t) for t in targets)]


# ---------------------------------------------------------------- conversions


def convert_to(src: Path, dst: Path, fmt: str, *, layout: str | None, alpha: float | None = None,
               ema: bool | None = None, lora_scale: float | None = None):
    """The converter's own entry point, as ``lora-parity convert`` calls it."""
    return convert(ConvertOptions(src=src, dst=dst, fmt=fmt, layout=layout, alpha=alpha, ema=ema,
                                  lora_scale=lora_scale))


def bitwise_diff(expected: dict, got: dict) -> list[str]:
    """Problems between two key -> Tensor dicts that must be identical (keys, dtypes, shapes, bytes)."""
    problems = [f"missing: {k}" for k in expected if k not in got]
    problems += [f"unexpected: {k}" for k in got if k not in expected]
    for k in expected:
        if k in got and not expected[k].bitwise_equal(got[k]):
            a, b = expected[k], got[k]
            problems.append(f"differs: {k} ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})")
    return problems


def diffusers_reads_kohya(entry: ModuleEntry, family: str) -> bool:
    """Whether diffusers' own kohya reader for this family maps the module (facts of diffusers 0.3x-0.42
    ``lora_conversion_utils``, established on the tiny pipelines in tests/test_transformer_families.py).

    SDXL, SD 1.x / 2.x: every module.  SD3: none (its loader takes PEFT names only; ComfyUI reads
    ``lora_transformer_``).  Flux (``_convert_mixture_state_dict_to_diffusers``): the attention projections inside
    double / single blocks, the top-level Linears (embedders, ``norm_out.linear``, ``proj_out``) and CLIP-L
    (``lora_te1_``); a block's feed-forward, norm modulation or single-block MLP would be put on the block itself,
    and a T5 LoRA (``lora_te2_``) is refused."""
    if family not in ("sd3", "flux"):
        return True
    if family == "sd3":
        return False
    if entry.component == "transformer":
        return "blocks." not in entry.sgm or ".attn." in entry.sgm
    return entry.component == "text_encoder"


def kohya_subset_for_diffusers(lora: LoraSet) -> tuple[LoraSet, list[str]]:
    """(the part of ``lora`` diffusers' kohya reader maps, the modules left out) -- see :func:`diffusers_reads_kohya`."""
    family = lora.layout.family
    keep = {k: p for k, p in lora.pairs.items() if diffusers_reads_kohya(p.module, family)}
    left = [p.module.sgm for p in lora.ordered() if p.module.sgm not in keep]
    return dataclasses.replace(lora, pairs=keep), left


# ---------------------------------------------------------------- the hollow pipeline


def pipeline_configs_for(layout: ModelLayout, layout_spec: str | None) -> tuple[dict[str, dict], bool]:
    """(component -> config, is_refiner) of the pipeline the layout describes: a built-in model by
    name, or the configs of a ``--lora-layout`` pipeline folder."""
    from lora_parity.bases.configs import PIPELINES, SD_PIPELINES

    if layout_spec is not None and Path(layout_spec).is_dir():
        folder = Path(layout_spec)
        comps = {c: json.loads((folder / c / "config.json").read_text())
                 for c in ("unet", "text_encoder", "text_encoder_2") if (folder / c / "config.json").is_file()}
        if "unet" not in comps:
            raise LoraParityError("no unet/config.json", path=folder)
        return comps, layout.family == "sdxl" and "text_encoder" not in comps
    if layout.name in SD_PIPELINES:
        unet, te = SD_PIPELINES[layout.name]
        return {"unet": unet, "text_encoder": te}, False
    if layout.name not in PIPELINES:
        raise LoraParityError(f"no built-in pipeline for layout '{layout.name}' (pass --lora-layout with the "
                              f"model's pipeline folder to load the LoRA in diffusers)")
    cfgs = PIPELINES[layout.name]
    return {c: cfg for c, cfg in cfgs.components().items() if c != "vae"}, cfgs.is_refiner


def _hollow(model):
    """Give every meta tensor a real zero-stride one of its shape and dtype (one element of memory)."""
    import torch

    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                mod._parameters[name] = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape),
                                                           requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[name] = torch.zeros((), dtype=b.dtype).expand(b.shape)
    return model


#: the components each SD3 / Flux pipeline's ``load_lora_weights`` loads (diffusers ``_lora_loadable_modules``):
#: neither loads a T5 LoRA, so the hollow pipelines are built without T5 (a T5 LoRA in the file is reported by
#: the load check as tensors diffusers did not use)
FLOW_LOADABLE = {"sd3": ("transformer", "text_encoder", "text_encoder_2"), "flux": ("transformer", "text_encoder")}


def flow_pipeline_parts(layout: ModelLayout, layout_spec: str | None) -> dict[str, tuple[str, dict]]:
    """component -> (model class, config) of the SD3 / Flux pipeline the layout describes, for the components its
    ``load_lora_weights`` loads: a built-in model by name (``sd3``, ``flux``, ``tiny-sd3``, ``tiny-flux``) or the
    configs of a ``--lora-layout`` pipeline folder (classes from its ``model_index.json``)."""
    from lora_parity.bases.flow_configs import FLOW_PIPELINES

    wanted = FLOW_LOADABLE[layout.family]
    if layout_spec is not None and Path(layout_spec).is_dir():
        folder = Path(layout_spec)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        out = {}
        for comp in wanted:
            cfg_path = folder / comp / "config.json"
            if not cfg_path.is_file():
                continue
            cls = "" if comp == "transformer" else (index.get(comp) or [None, None])[1]
            if comp != "transformer" and cls not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
                raise LoraParityError(f"model_index.json names {cls!r} for {comp} (expected a CLIP text model)",
                                      path=folder)
            out[comp] = (cls, json.loads(cfg_path.read_text()))
        if "transformer" not in out:
            raise LoraParityError("no transformer/config.json", path=folder)
        return out
    if layout.name not in FLOW_PIPELINES:
        raise LoraParityError(f"no built-in pipeline for layout '{layout.name}' (pass --lora-layout with the "
                              f"model's pipeline folder to load the LoRA in diffusers)")
    cfgs = FLOW_PIPELINES[layout.name]
    out = {"transformer": ("", cfgs.transformer)}
    out.update({comp: (cls, cfg) for comp, cls, cfg in cfgs.text_encoders if comp in wanted})
    return out


def hollow_pipeline(layout: ModelLayout, layout_spec: str | None = None):
    """A real-size pipeline object of the layout's family (SDXL base or refiner, SD 1.x / 2.x, SD3, Flux):
    diffusers' and transformers' own module trees with real shapes and no weights (meta device, then zero-stride
    tensors).  SD3 / Flux: the transformer and the CLIP encoders their loader fills (no T5, no VAE)."""
    if layout.is_transformer:
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        from lora_parity.bases.flow_configs import flow_meta_model

        models = {c: _hollow(flow_meta_model(c, cls, cfg)) for c, (cls, cfg) in
                  flow_pipeline_parts(layout, layout_spec).items()}
        if layout.family == "sd3":
            pipe = StableDiffusion3Pipeline(transformer=models["transformer"], scheduler=None, vae=None,
                                            text_encoder=models.get("text_encoder"), tokenizer=None,
                                            text_encoder_2=models.get("text_encoder_2"), tokenizer_2=None,
                                            text_encoder_3=None, tokenizer_3=None)
        else:
            pipe = FluxPipeline(transformer=models["transformer"], scheduler=None, vae=None,
                                text_encoder=models.get("text_encoder"), tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from lora_parity.bases.configs import meta_model

    comps, refiner = pipeline_configs_for(layout, layout_spec)
    models = {c: _hollow(meta_model(c, cfg)) for c, cfg in comps.items()}
    if layout.family != "sdxl":
        pipe = StableDiffusionPipeline(vae=None, text_encoder=models.get("text_encoder"), tokenizer=None,
                                       unet=models["unet"], scheduler=None, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    kwargs = dict(vae=None, text_encoder=models.get("text_encoder"), text_encoder_2=models.get("text_encoder_2"),
                  tokenizer=None, tokenizer_2=None, unet=models["unet"], scheduler=None)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**kwargs, requires_aesthetics_score=True)
    else:
        pipe = StableDiffusionXLPipeline(**kwargs, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _norm(name: str) -> str:
    return name.replace(".text_model.", ".")  # transformers 5's CLIPTextModel has no text_model.


def adapter_modules(pipe, adapter: str) -> dict[str, object]:
    """``component.<module>`` (text_model. dropped) -> PEFT LoRA layer holding ``adapter``."""
    out = {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, mod in model.named_modules():
            lora_a = getattr(mod, "lora_A", None)
            if lora_a is not None and hasattr(lora_a, "keys") and adapter in lora_a.keys():
                out[_norm(f"{comp}.{name}")] = mod
    return out


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").double().numpy()


def _factor(got: np.ndarray, want: np.ndarray, rtol: float) -> float | None:
    """The c with ``got == c * want`` elementwise (to ``rtol`` of each product), or None when no factor fits."""
    denom = float((want * want).sum())
    if denom == 0.0:
        return 1.0 if not got.any() else None
    c = float((got * want).sum()) / denom
    ref = np.abs(c * want)
    ok = np.abs(got - c * want) <= rtol * ref + rtol * 1e-2 * float(ref.max())
    return c if bool(ok.all()) else None


#: relative rounding of a tensor of this dtype multiplied by a factor in its own dtype (diffusers' kohya readers)
_DTYPE_RTOL = {"F16": 2.0 ** -10, "BF16": 2.0 ** -7}


def check_adapter(pipe, lora: LoraSet, adapter: str, *, folded_alpha: bool = False) -> tuple[list[str], int]:
    """Every module of ``lora`` holds its LoRA in ``adapter``: the right module (by the key map), the
    base layer's shape fits, A and B equal the file's values, scaling = alpha / rank; no extra module.

    ``folded_alpha``: the reader multiplied alpha/rank into the tensors instead (diffusers' Flux kohya reader:
    lora_A x s_down, lora_B x s_up, PEFT scaling 1): then A and B must be the file's times one factor each, and
    the two factors times the scaling must give alpha/rank.  Returns (problems, modules checked)."""
    found = adapter_modules(pipe, adapter)
    problems, expected = [], set()
    for p in lora.ordered():
        n = len(p.module.diffusers)
        a = p.A.to_float()
        b = p.B.to_float()
        rows = b.shape[0] // n
        for i, dif in enumerate(p.module.diffusers):
            name = _norm(dif)
            expected.add(name)
            mod = found.get(name)
            if mod is None:
                problems.append(f"{dif}: no LoRA layer (from {p.module.sgm})")
                continue
            la, lb = _np(mod.lora_A[adapter].weight), _np(mod.lora_B[adapter].weight)
            want_b = b[i * rows:(i + 1) * rows]
            base = tuple(mod.base_layer.weight.shape)
            if la.shape != a.shape or lb.shape != want_b.shape:
                problems.append(f"{dif}: LoRA shapes {list(la.shape)}/{list(lb.shape)}, file "
                                f"{list(a.shape)}/{list(want_b.shape)}")
                continue
            if base[0] != lb.shape[0] or base[1] != la.shape[1] or base[2:] != la.shape[2:]:
                problems.append(f"{dif}: base layer {list(base)} does not fit LoRA {list(la.shape)}/{list(lb.shape)}")
            scale = float(mod.scaling[adapter])
            if folded_alpha:
                rtol = _DTYPE_RTOL.get(p.A.dtype, 1e-6)
                ca, cb = _factor(la, a, rtol), _factor(lb, want_b, rtol)
                if ca is None or cb is None:
                    problems.append(f"{dif}: holds other values than {p.module.sgm} in the file (not even up to a "
                                    f"factor)")
                elif not np.isclose(ca * cb * scale, p.alpha / p.rank, rtol=max(4 * rtol, 1e-6), atol=0):
                    problems.append(f"{dif}: effective scale {ca * cb * scale:g}, expected alpha/rank = "
                                    f"{p.alpha:g}/{p.rank}")
                continue
            if not (np.array_equal(la, a) and np.array_equal(lb, want_b)):
                problems.append(f"{dif}: holds other values than {p.module.sgm} in the file")
            if not np.isclose(scale, p.alpha / p.rank, rtol=1e-12, atol=0):
                problems.append(f"{dif}: scaling {scale:g}, expected alpha/rank = {p.alpha:g}/{p.rank}")
    problems += [f"{k}: LoRA layer that the file does not have" for k in sorted(set(found) - expected)]
    return problems, len(expected)


def compare_adapters(pipe, ref: str, other: str, *, values: bool = True) -> tuple[list[str], int]:
    """``other`` sits on exactly the modules of ``ref`` with equal A, B and scaling (``values=False``: the same
    modules only, where one reader folds alpha/rank into the tensors and :func:`check_adapter` judged them)."""
    a, b = adapter_modules(pipe, ref), adapter_modules(pipe, other)
    problems = [f"{k}: only the {ref} file's LoRA lands here" for k in sorted(set(a) - set(b))]
    problems += [f"{k}: only the {other} file's LoRA lands here" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)) if values else ():
        m = a[k]
        for half in ("lora_A", "lora_B"):
            x, y = getattr(m, half)[ref].weight, getattr(m, half)[other].weight
            if x.shape != y.shape or not np.array_equal(_np(x), _np(y)):
                problems.append(f"{k}: {half} differs between the {ref} and {other} loads")
        if not np.isclose(float(m.scaling[ref]), float(m.scaling[other]), rtol=1e-6, atol=0):
            problems.append(f"{k}: scaling {m.scaling[other]:g} ({other}) vs {m.scaling[ref]:g} ({ref})")
    return problems, len(set(a) & set(b))
