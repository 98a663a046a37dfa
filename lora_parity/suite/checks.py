"""What the shipped suite computes on the user's LoRA, one stage at a time.

Each stage (read, finiteness, completeness, layout, resolution, strict mapping) is computed once
and cached with its error; the test that owns a stage fails with that error, every test that
needs the stage is skipped naming that test, so one fault fails one named test.

Nothing here needs base weights: diffusers' ``load_lora_weights`` runs on a real-size SDXL
pipeline whose modules are built on the meta device and then given zero-stride tensors of their
real shapes (:func:`hollow_pipeline`: real module tree and shapes, about no memory), so PEFT
attaches real LoRA layers to real-shaped modules.
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
from lora_parity.convert.layout import PRESETS, ModelLayout, load_layout
from lora_parity.convert.lora_set import LoraSet, NamedHalves, choose_layout, resolve

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
    ``in_layers.2``, ``self_attn.q_proj``, ``attn.in_proj`` (the name after its last index)."""
    parts = re.split(r"\.\d+\.", entry.sgm)
    return entry.component, parts[-1]


def group(entry: ModuleEntry) -> str:
    """Column of the coverage table."""
    s = entry.sgm
    if entry.component != "unet":
        return "text attention" if (".self_attn." in s or ".attn." in s) else "text mlp"
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
                raise KeyMapError("no LoRA module name belongs to a known layout (sdxl-base, sdxl-refiner, sd15, sd21); "
                                  "pass --lora-layout with the model's config.json or pipeline folder", path=self.path)
            sub = dataclasses.replace(h, modules=known, keys={m: h.keys[m] for m in known})
            layout, note = choose_layout(sub, None)
            if len(known) < len(h.modules):
                note += f", from the {len(known)} of {len(h.modules)} modules whose names a layout knows"
            return layout, note, len(known)
        return self._stage("layout", run)

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
        what MindONE trains by default for this layout: q/k/v/out of every UNet attention."""
        lora = self.resolved()
        km = lora.keymap
        present = set(lora.pairs)
        groups = list(dict.fromkeys(group(e) for e in km.lora_entries()))
        table: dict[str, Counter] = {}
        avail: dict[str, Counter] = {}
        for e in km.lora_entries():
            row = e.block if e.component == "unet" else e.component  # text encoders: one row each
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
        default = [e for e in km.attention_entries()]
        lacking = [e for e in default if e.sgm not in present]
        extra = sorted(present - {e.sgm for e in default})
        info = {"modules": len(present), "mindone_default": len(default), "mindone_default_covered":
                len(default) - len(lacking), "lacking_blocks": sorted({e.block for e in lacking},
                                                                       key=lambda b: list(avail).index(b)),
                "beyond_default": len(extra)}
        return lines, info


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


def hollow_pipeline(layout: ModelLayout, layout_spec: str | None = None):
    """A real-size pipeline object of the layout's family (SDXL base or refiner, SD 1.x / 2.x): diffusers' and
    transformers' own module trees with real shapes and no weights (meta device, then zero-stride tensors)."""
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


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


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


def check_adapter(pipe, lora: LoraSet, adapter: str) -> tuple[list[str], int]:
    """Every module of ``lora`` holds its LoRA in ``adapter``: the right module (by the key map), the
    base layer's shape fits, A and B equal the file's values, scaling = alpha / rank; no extra module.
    Returns (problems, modules checked)."""
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
            if not (np.array_equal(la, a) and np.array_equal(lb, want_b)):
                problems.append(f"{dif}: holds other values than {p.module.sgm} in the file")
            scale = float(mod.scaling[adapter])
            if not np.isclose(scale, p.alpha / p.rank, rtol=1e-12, atol=0):
                problems.append(f"{dif}: scaling {scale:g}, expected alpha/rank = {p.alpha:g}/{p.rank}")
    problems += [f"{k}: LoRA layer that the file does not have" for k in sorted(set(found) - expected)]
    return problems, len(expected)


def compare_adapters(pipe, ref: str, other: str) -> tuple[list[str], int]:
    """``other`` sits on exactly the modules of ``ref`` with equal A, B and scaling."""
    a, b = adapter_modules(pipe, ref), adapter_modules(pipe, other)
    problems = [f"{k}: only the {ref} file's LoRA lands here" for k in sorted(set(a) - set(b))]
    problems += [f"{k}: only the {other} file's LoRA lands here" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        m = a[k]
        for half in ("lora_A", "lora_B"):
            x, y = getattr(m, half)[ref].weight, getattr(m, half)[other].weight
            if x.shape != y.shape or not np.array_equal(_np(x), _np(y)):
                problems.append(f"{k}: {half} differs between the {ref} and {other} loads")
        if not np.isclose(float(m.scaling[ref]), float(m.scaling[other]), rtol=1e-6, atol=0):
            problems.append(f"{k}: scaling {m.scaling[other]:g} ({other}) vs {m.scaling[ref]:g} ({ref})")
    return problems, len(set(a) & set(b))
