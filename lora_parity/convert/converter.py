"""MindSpore <-> PyTorch LoRA conversion: file -> reader -> key map -> writer.

The direction follows the input: a MindONE-named LoRA becomes PEFT (default) or
kohya; a PEFT or kohya LoRA becomes a MindONE ``.ckpt``.  Inputs are never
modified, outputs are written atomically, and an existing output is kept
unless ``force`` is set.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_parity.convert import formats
from lora_parity.errors import LoraParityError, OutputExistsError
from lora_parity.convert.layout import ModelLayout, load_layout
from lora_parity.convert.lora_set import LoraSet, check_alpha, resolve
from lora_parity.convert.tensor import DTYPE_ALIASES


@dataclass(frozen=True)
class ConvertOptions:
    src: Path
    dst: Path | None = None
    fmt: str | None = None  # None: peft for an MS source, ms for a PT source
    layout: str | None = None  # preset name, config.json or pipeline folder
    alpha: float | None = None
    dtype: str = "keep"
    force: bool = False
    strict: bool = True
    progress: bool = False
    ema: bool | None = None  # MindONE file with both sets: True = 'ema.' copies, False = trained ones
    lora_scale: float | None = None  # MindONE SD 1.x / 2.x LoRA: the --lora_scale it runs with (alpha = scale * rank)


@dataclass
class ConversionReport:
    """What a conversion did, for the one-screen summary and for tests."""

    src: Path
    dst: Path | None
    src_format: str
    dst_format: str
    layout_note: str
    modules: int
    tensors_written: int
    blocks: Counter
    ranks: Counter
    alphas: Counter
    dtypes: Counter
    bytes_in: int
    bytes_out: int
    seconds: float
    scale_note: str
    skipped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    ignored: dict[str, list[str]] = field(default_factory=dict)  # kind -> skipped keys
    notes: list[str] = field(default_factory=list)
    biases: int = 0  # trained biases carried

    def ignored_counts(self) -> dict[str, int]:
        """Skipped entries counted by kind (optimizer state, base-model weights, ...)."""
        return {kind: len(keys) for kind, keys in self.ignored.items() if keys}

    def summary(self) -> str:
        def fmt_counter(c: Counter) -> str:
            return ", ".join(f"{k} ({v})" if len(c) > 1 else f"{k}" for k, v in sorted(c.items(), key=str))

        lines = [
            f"{self.src} [{self.src_format}] -> {self.dst or '(dry run)'} [{self.dst_format}]",
            f"  {self.layout_note}",
            f"  modules: {self.modules}   tensors written: {self.tensors_written}   "
            f"rank: {fmt_counter(self.ranks)}   alpha: {fmt_counter(self.alphas)}   dtype: {fmt_counter(self.dtypes)}",
            f"  bytes: {self.bytes_in:,} in, {self.bytes_out:,} out   time: {self.seconds:.2f} s",
            f"  scale: {self.scale_note}",
        ]
        lines.append("  modules per block: " + ", ".join(f"{b} {n}" for b, n in self.blocks.items()))
        for note in self.notes:
            lines.append(f"  took {note}")
        if self.skipped:
            shown = ", ".join(self.skipped[:4]) + (" ..." if len(self.skipped) > 4 else "")
            kinds = ", ".join(f"{n} {kind}" for kind, n in self.ignored_counts().items())
            lines.append(f"  skipped {len(self.skipped)} non-LoRA entr{'y' if len(self.skipped) == 1 else 'ies'}"
                         + (f" ({kinds})" if kinds else "") + f": {shown}")
        if self.unmapped:
            shown = ", ".join(self.unmapped[:4]) + (" ..." if len(self.unmapped) > 4 else "")
            lines.append(f"  NOT converted (--no-strict) {len(self.unmapped)} unmapped LoRA key(s): {shown}")
        return "\n".join(lines)


def resolve_dtype(name: str) -> str | None:
    if name == "keep":
        return None
    if name not in DTYPE_ALIASES:
        raise LoraParityError(f"--dtype must be keep, {', '.join(DTYPE_ALIASES)}; got '{name}'")
    return DTYPE_ALIASES[name]


def load_lora(src: Path, *, layout: ModelLayout | None = None, alpha: float | None = None,
              strict: bool = True, progress: bool = False, ema: bool | None = None,
              lora_scale: float | None = None) -> LoraSet:
    """Read and validate any supported LoRA file.

    MindONE checkpoints may be ``*_lora.ckpt``, ``*_lora_ema.ckpt`` (EMA weights under the
    same names) or training checkpoints holding base weights, optimizer state and
    counters next to the LoRA: only the LoRA tensors are taken, the rest is listed in
    ``LoraSet.ignored`` by kind.  A file holding both plain and ``ema.`` LoRA tensors needs
    ``ema=True`` (the EMA copies) or ``ema=False`` (the trained ones).
    """
    non_tensor: list[str] = []
    tensors, meta, container = formats.read_tensors(src, progress=progress, non_tensor=non_tensor)
    fmt = formats.detect_format(tensors)
    if fmt == "unknown":
        raise LoraParityError(f"no LoRA tensors recognised among {len(tensors)} keys "
                              f"(expected MindONE '.lora_A.weight', PEFT 'unet.' or kohya 'lora_unet_' names)",
                              path=src, key=next(iter(tensors), None))
    halves = formats.parse(src, tensors, meta, fmt, ema=ema, non_tensor=non_tensor)
    if lora_scale is not None and alpha is not None:
        raise LoraParityError("--alpha and --lora-scale both set the scale; give one")
    return resolve(halves, layout, alpha=alpha, strict=strict, scale=check_alpha(lora_scale, "--lora-scale"))


def default_format(lora: LoraSet, src_is_ms: bool) -> str:
    """PEFT for a MindSpore-side file, a MindONE .ckpt for a PyTorch one; SD3 / Flux have no MindONE .ckpt
    (mindone.diffusers saves PEFT), so their PEFT and kohya files convert into each other."""
    if lora.layout.is_transformer:  # a wrapped training checkpoint: the PEFT file its trainer would save
        return "kohya" if lora.source_format == "peft" and not src_is_ms else "peft"
    return "peft" if src_is_ms else "ms"


def default_output(src: Path, dst_fmt: str, *, transformer: bool = False) -> Path:
    """Beside the source; an SD3 / Flux PEFT file's kohya twin is ``<stem>_kohya.safetensors``."""
    stem = src.name.split(".")[0] if src.suffix else src.name
    if transformer and dst_fmt == "kohya":
        return src.with_name(f"{stem}_kohya.safetensors")
    return src.with_name(f"{stem}_ms.ckpt" if dst_fmt == "ms" else f"{stem}_pt.safetensors")


def convert(opts: ConvertOptions) -> ConversionReport:
    """Convert ``opts.src``; raises :class:`LoraParityError` on any bad input, writing nothing."""
    t0 = time.perf_counter()
    src = Path(opts.src)
    if opts.fmt is not None and opts.fmt not in formats.FORMATS:
        raise LoraParityError(f"--format must be one of {', '.join(formats.FORMATS)}; got '{opts.fmt}'")
    dtype = resolve_dtype(opts.dtype)
    alpha = check_alpha(opts.alpha)
    layout = load_layout(opts.layout) if opts.layout else None
    if opts.dst is not None:
        _check_output(src, Path(opts.dst), opts.force)  # fail before the (possibly long) read

    lora = load_lora(src, layout=layout, alpha=alpha, strict=opts.strict, progress=opts.progress, ema=opts.ema,
                     lora_scale=opts.lora_scale)
    # a mindone.diffusers training checkpoint is MindSpore's, though its names are diffusers': PEFT by default,
    # the file its trainer's save_lora_weights would write at the end
    src_is_ms = lora.source_format == "ms" or lora.source_kind == formats.WRAPPED_MODEL
    dst_fmt = opts.fmt or default_format(lora, src_is_ms)
    dst = (Path(opts.dst) if opts.dst is not None
           else default_output(src, dst_fmt, transformer=lora.layout.is_transformer))
    _check_output(src, dst, opts.force)
    formats.check_writable(lora, dst_fmt, src, dst)
    if dst_fmt == "ms" and formats.ms_style(lora) == "gm":
        _check_ms_alpha(lora, src)
    lora = lora.cast(dtype)
    nbytes, n_tensors = formats.write(dst, lora, dst_fmt)
    return ConversionReport(
        src=src, dst=dst, src_format=lora.source_format, dst_format=dst_fmt,
        layout_note=lora.layout_note, modules=len(lora.pairs), tensors_written=n_tensors,
        blocks=lora.keymap.block_counts(p.module.sgm for p in lora.ordered()),
        ranks=lora.ranks(), alphas=lora.alphas(), dtypes=lora.dtypes(),
        bytes_in=src.stat().st_size, bytes_out=nbytes, seconds=time.perf_counter() - t0,
        scale_note=_scale_note(lora, dst_fmt), skipped=lora.skipped, unmapped=lora.unmapped,
        ignored=lora.ignored, notes=lora.notes, biases=len(lora.biased()),
    )


def _check_output(src: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src.resolve():
        raise LoraParityError("output would overwrite the input", path=dst)
    if dst.exists() and not force:
        raise OutputExistsError("output exists; pass --force to overwrite it", path=dst)
    if not dst.parent.is_dir():
        raise LoraParityError("output folder does not exist", path=dst.parent)


def _check_ms_alpha(lora: LoraSet, src: Path) -> None:
    """A MindONE .ckpt stores no alpha: inference gives one lora_alpha (scale alpha / each module's rank),
    or none (alpha = rank, scale 1).  So the file is exact only if every module has the same alpha, or
    every module has scale 1 (a fused bigG in_proj built from three rank-r LoRAs has rank 3r, alpha 3a)."""
    if len(lora.alphas()) > 1 and any(p.alpha != p.rank for p in lora.pairs.values()):
        fused = [p for p in lora.ordered() if p.part_ranks]
        why = (f" ({len(fused)} fused in_proj LoRA(s) built from separate q/k/v LoRAs have rank "
               f"{fused[0].rank} and alpha {fused[0].alpha:g} to keep alpha/r)" if fused else "")
        raise LoraParityError(
            f"modules have different alphas {sorted(lora.alphas())}{why}; a MindONE .ckpt has one lora_alpha "
            f"for all modules or alpha = rank everywhere (pass --alpha to choose one, or keep this LoRA as "
            f"peft / kohya)", path=src)


def _scale_note(lora: LoraSet, dst_fmt: str) -> str:
    alphas = sorted(lora.alphas())
    if dst_fmt == "peft":
        return "alpha/r kept exactly in the 'lora_adapter_metadata' header (lora_B not rescaled)"
    if dst_fmt == "kohya":
        return "alpha/r kept exactly in per-module '.alpha' tensors (lora_up not rescaled)"
    if formats.ms_style(lora) == "ldm":  # one rank, one scale (checked by formats.check_writable)
        p = next(iter(lora.pairs.values()))
        return (f"MindONE's SD 1.x / 2.x LoRA stores no scale: run with --lora_rank {p.rank} "
                f"--lora_scale {p.scale:g}")
    if len(alphas) > 1:  # every module at scale 1 (checked by _check_ms_alpha)
        return "MindONE stores no alpha: run without lora_alpha (alpha = each module's rank, scale 1)"
    return (f"MindONE stores no alpha: run with lora_alpha={alphas[0]:g}"
            + (" (= rank, scale 1)" if all(p.alpha == p.rank for p in lora.pairs.values()) else ""))
