"""``compare``: run both backends on the same inputs, align every layer, report.

Data flow: fixture/user files -> PyTorch backend (diffusers + load_lora_weights)
and MindSpore backend (SGM cells + MindONE LoRA) -> aligner -> ParityReport.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .align import conditioning_alignment, text_alignment, unet_alignment, vae_alignment
from .errors import LoraParityError
from .layout import layout_from_pipeline_dir
from .parity import ParityReport, compare, compare_low_precision
from .sides.request import SideRequest, SideResult
from .sides.run import run_side
from .tolerances import PORT, image_gate, layer_tolerance

DEFAULT_TIMESTEP = 500.0


@dataclass
class CompareOptions:
    pt_base: Path | None = None  # an explicit pair: a diffusers folder ...
    ms_base: Path | None = None  # ... and the same weights as a MindSpore .ckpt (SGM names)
    base: str | None = None  # or one SPEC for both sides (folder, single file, random:NAME[:SEED])
    variant: str | None = None  # diffusers weight variant ("fp16") of a folder base
    cache: Path | None = None  # where random:/single-file bases are materialised
    ms_lora: Path | None = None
    pt_lora: Path | None = None
    latents: Path | None = None
    height: int | None = None  # image size (latents are height/8 x width/8 for SDXL)
    width: int | None = None
    prompt: str | None = None
    alpha: float | None = None
    timestep: float = DEFAULT_TIMESTEP
    timesteps: tuple[float, ...] | None = None  # several UNet timesteps (default: (timestep,))
    dtype: str = "F32"
    merge: bool = False  # fold the LoRA into the MindSpore weights instead of running it unmerged
    steps: int | None = None  # denoising steps for the full-image comparison (None: layers only)
    guidance: float = 5.0
    progress: bool = False  # a bar per denoising step on both sides
    image_mae: float | None = None  # override of the image gate's MAE bound (tolerances.image_gate)
    image_max_error: int | None = None  # override of the image gate's max-error bound
    ms_graph: bool = False  # MindSpore graph mode for the image generation (activations run PyNative)
    ms_device: str = "CPU"  # Ascend / CPU / GPU for the MindSpore side; PyTorch runs on pt_device
    pt_device: str = "cpu"
    tol_overrides: dict = field(default_factory=dict)  # dtype -> bound on max|a-b|/max|ref| (replaces the budget)
    mismatch_overrides: dict = field(default_factory=dict)  # dtype -> bound on the mismatch fraction
    backend: str = PORT  # which MindSpore implementation is judged: picks the rows of the tolerance table
    report_dir: Path | None = None
    pt_format: str = "peft"  # what the .ckpt is converted to for diffusers: peft, or kohya (ComfyUI/A1111 files)
    isolate: bool = True  # each side in its own child process (one model in memory at a time)
    keep_captures: Path | None = None  # save each side's capture here (pt/, ms/, pt_<dtype>/)
    reuse_captures: dict = field(default_factory=dict)  # side -> a kept capture folder made from the same inputs
    aesthetic_score: float = 6.0  # refiner conditioning, diffusers' defaults
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class _Base:
    """Where each side's weights come from, resolved once."""

    pipeline_dir: Path
    variant: str | None
    base_spec: str | None
    ms_ckpt: Path | None
    is_refiner: bool
    default_image_size: int | None


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def resolve_bases(o: CompareOptions, sides: tuple[str, ...] = ("pt", "ms")) -> _Base:
    """``--base SPEC`` or the explicit ``--pt-base``/``--ms-base`` pair; one error if neither or both.

    ``sides``: which sides will run (``infer --backend pt`` needs no MindSpore weights)."""
    for p in (o.ms_lora, o.pt_lora, o.latents):
        if p is not None and not Path(p).is_file():
            raise LoraParityError("no such file", path=p)
    if o.base is not None:
        if o.pt_base is not None or o.ms_base is not None:
            raise LoraParityError("give --base, or the pair --pt-base/--ms-base, not both")
        from .bases import resolve_base

        b = resolve_base(o.base, variant=o.variant, cache=o.cache, progress=o.progress)
        return _Base(b.pipeline_dir, b.variant, o.base, None, b.is_refiner, b.default_image_size)
    if o.pt_base is None or (o.ms_base is None and "ms" in sides):
        need = "--pt-base DIR and --ms-base CKPT" if "ms" in sides else "--pt-base DIR"
        raise LoraParityError(f"give --base SPEC, or {need}")
    if not (Path(o.pt_base) / "model_index.json").is_file():
        raise LoraParityError("not a diffusers pipeline folder (no model_index.json)", path=o.pt_base)
    if o.ms_base is not None and not Path(o.ms_base).is_file():
        raise LoraParityError("no such file", path=o.ms_base)
    index = _json(Path(o.pt_base) / "model_index.json")
    return _Base(Path(o.pt_base), o.variant, None, Path(o.ms_base) if o.ms_base else None,
                 bool(index.get("requires_aesthetics_score")), None)


def compare_latents(o: CompareOptions, base: _Base) -> np.ndarray:
    """The start latents: ``--latents``, else seed-0 noise of the requested (or the base's default) size."""
    from .infer import read_latents, vae_scale_factor

    if o.latents is not None or (o.height is None and o.width is None and base.default_image_size is None):
        latents = read_latents(o.latents, base.pipeline_dir)
        if o.height is not None or o.width is not None:
            f = vae_scale_factor(base.pipeline_dir)
            want = (o.height or latents.shape[2] * f, o.width or latents.shape[3] * f)
            if want != (latents.shape[2] * f, latents.shape[3] * f):
                raise LoraParityError(f"latents {list(latents.shape)} are not for a {want[0]}x{want[1]} image",
                                      path=o.latents or "built-in latents")
        return latents
    from .fixtures.tiny_pipeline import make_latents

    f = vae_scale_factor(base.pipeline_dir)
    h = o.height or base.default_image_size
    w = o.width or base.default_image_size
    unet = _json(base.pipeline_dir / "unet" / "config.json")
    step = f * 2 ** (len(unet["block_out_channels"]) - 1)
    if h % step or w % step:
        raise LoraParityError(f"--height/--width must be multiples of {step} for this model, got {h}x{w}")
    return make_latents(0, (1, int(unet.get("in_channels", 4)), h // f, w // f))


def side_request(o: CompareOptions, base: _Base, side: str, **kw) -> SideRequest:
    """One side's request from the options and the resolved base (``compare`` and ``infer`` build them alike)."""
    return SideRequest(
        side=side, pipeline_dir=str(base.pipeline_dir), variant=base.variant, base_spec=base.base_spec,
        ms_ckpt=str(base.ms_ckpt) if base.ms_ckpt else None, cache=str(o.cache) if o.cache else None,
        alpha=o.alpha, guidance=o.guidance, merge=o.merge, graph=o.ms_graph, progress=o.progress,
        aesthetic=[o.aesthetic_score, o.negative_aesthetic_score] if base.is_refiner else None,
        device=o.ms_device if side == "ms" else o.pt_device, **kw)


def _side(o: CompareOptions, name: str, req: SideRequest) -> SideResult:
    """Run one side, or take a kept capture of it after checking it was made from these inputs."""
    kept = o.reuse_captures.get(name)
    if kept is not None:
        out = SideResult.load(Path(kept))
        want, got = req.fingerprint(), out.meta.get("inputs", {})
        skip = {"arrays"} | ({"steps", "guidance"} if req.steps is None else set())  # no images compared
        diff = sorted(k for k in want if k not in skip and want[k] != got.get(k))
        diff += sorted(f"arrays.{k}" for k, v in want["arrays"].items() if got.get("arrays", {}).get(k) != v)
        if diff:
            raise LoraParityError(f"kept capture was made from other inputs ({', '.join(diff)})", path=kept)
        return out
    out = run_side(req, isolate=o.isolate)
    if o.keep_captures is not None:
        out.save(Path(o.keep_captures) / name)
    return out


def run_compare(o: CompareOptions) -> ParityReport:
    base = resolve_bases(o)
    from .backends.mindspore_backend import CPU_DTYPES

    if o.ms_device == "CPU" and o.dtype not in CPU_DTYPES:  # before any side runs
        raise LoraParityError(f"--dtype {o.dtype}: MindSpore on CPU has no {o.dtype} MatMul kernel "
                              f"(run it with --ms-device Ascend)")
    from .fixtures.tiny_pipeline import DEFAULT_PROMPT
    from .infer import default_size_cond

    prompt = o.prompt if o.prompt is not None else DEFAULT_PROMPT
    latents = compare_latents(o, base)
    size_cond = [list(p) for p in default_size_cond(base.pipeline_dir, latents)]
    timesteps = [float(t) for t in (o.timesteps or (o.timestep,))]
    common = dict(prompt=prompt, timesteps=timesteps, size_cond=size_cond, steps=o.steps,
                  arrays={"latents": latents})
    with tempfile.TemporaryDirectory(prefix="lora-parity-") as tmp:
        pt_lora = Path(o.pt_lora) if o.pt_lora else None
        if pt_lora is None and o.ms_lora is not None:
            from .convert import ConvertOptions, convert

            pt_lora = Path(tmp) / "converted_pt.safetensors"
            convert(ConvertOptions(src=Path(o.ms_lora), dst=pt_lora, layout=str(base.pipeline_dir), alpha=o.alpha,
                                   fmt=o.pt_format))
        lora = str(pt_lora) if pt_lora else None
        pt = _side(o, "pt", side_request(o, base, "pt", lora=lora, dtype="F32", **common))
        pt_low = (_side(o, "pt_" + o.dtype.lower(),
                        side_request(o, base, "pt", lora=lora, dtype=o.dtype, **common))
                  if o.dtype != "F32" else None)
    inputs = {k[len("_inputs."):]: v for k, v in pt.acts.items() if k.startswith("_inputs.")}
    ms_common = dict(common, arrays={"latents": latents, **inputs})
    ms = _side(o, "ms", side_request(o, base, "ms", lora=str(o.ms_lora) if o.ms_lora else None, dtype=o.dtype,
                                 **ms_common))
    layout = layout_from_pipeline_dir(base.pipeline_dir)
    vae_blocks = len(_json(base.pipeline_dir / "vae" / "config.json")["block_out_channels"])
    alignment = (text_alignment(layout) + conditioning_alignment() + unet_alignment(layout, timesteps)
                 + vae_alignment(vae_blocks))
    gate = layer_tolerance(o.dtype, o.tol_overrides, o.backend, o.mismatch_overrides)
    if pt_low is None:
        report = compare(alignment, ms.acts, pt.acts, gate, o.dtype)
    else:
        report = compare_low_precision(alignment, ms.acts, pt_low.acts, pt.acts, gate)
    sides = {"pytorch": pt.meta, "mindspore": ms.meta}
    if pt_low is not None:
        sides["pytorch_" + o.dtype.lower()] = pt_low.meta
    report.meta.update({
        "dtype": o.dtype, "timestep": timesteps[0], "timesteps": timesteps, "prompt": prompt,
        "latents_shape": list(latents.shape), "image_size": [int(v) for v in size_cond[2]],
        "base": o.base if o.base else {"pt_base": str(o.pt_base), "ms_base": str(o.ms_base)},
        "variant": base.variant, "refiner": base.is_refiner,
        "ms_lora": str(o.ms_lora) if o.ms_lora else None, "pt_lora": str(o.pt_lora) if o.pt_lora else "converted",
        "backend": o.backend,
        # the gate row (with overrides); low-precision runs: the per-layer budgets are in layers[*]
        "tolerance": {**gate.to_dict(), "low_precision_budget": pt_low is not None},
        "mindspore_settings": ms.meta.get("mindspore_settings"),
        "unet_first_forward_seconds": {"mindspore": ms.meta["unet_forward_seconds"][0],
                                       "pytorch": pt.meta["unet_forward_seconds"][0]},
        "peak_rss_bytes": {name: m.get("peak_rss_bytes") for name, m in sides.items()},
        "rss_after_bytes": {name: m.get("rss_after_bytes") for name, m in sides.items()},
        "seconds": {name: m.get("seconds") for name, m in sides.items()},
        "isolated_processes": o.isolate,
    })
    images = None
    if o.steps:
        images = _image_check(o, report, ms, pt, pt_low)
    if o.report_dir is not None:
        from .report import write_report

        write_report(Path(o.report_dir), report, images)
    return report


def _image_check(o: CompareOptions, report: ParityReport, ms: SideResult, pt: SideResult,
                 pt_low: SideResult | None) -> dict[str, np.ndarray]:
    """Full-image metrics of the two generated images; recorded in the report, part of pass/fail.

    fp32: MindSpore's image against PyTorch's.  fp16/bf16: both sides generate in that dtype
    and MindSpore's image is judged against PyTorch's fp32 image (the reference); PyTorch's own
    low-precision image error is recorded next to it.
    """
    from .image_metrics import image_metrics
    from .sampling import to_uint8
    ms_img, pt_img = to_uint8(ms.images["image"]), to_uint8(pt.images["image"])
    m = image_metrics(ms_img, pt_img)
    gate = image_gate(o.dtype, o.backend, ms_device=o.ms_device, pt_device=o.pt_device, mae=o.image_mae,
                      max_error=o.image_max_error)
    passed = m.mae < gate["mae"] and (gate["max_error"] is None or m.max_error <= gate["max_error"])
    per_step = {"mindspore": float(ms.meta["seconds_per_step"]), "pytorch": float(pt.meta["seconds_per_step"])}
    report.image = {**m.to_dict(), "mae_threshold": gate["mae"], "max_error_threshold": gate["max_error"],
                    "gate": gate, "passed": passed,
                    "steps": o.steps, "guidance": o.guidance, "dtype": o.dtype, "reference": "pytorch fp32",
                    "seconds_per_step": per_step,
                    "title": f"{o.steps} steps, guidance {o.guidance:g}: MAE {m.mae:.3f}, PSNR {m.psnr:.1f} dB, "
                             f"SSIM {m.ssim:.4f}"}
    out = {"ms": ms_img, "pt": pt_img}
    if pt_low is not None:
        low = to_uint8(pt_low.images["image"])
        report.image["pytorch_low_precision_vs_reference"] = image_metrics(low, pt_img).to_dict()
        report.image["seconds_per_step"]["pytorch_" + o.dtype.lower()] = float(pt_low.meta["seconds_per_step"])
        out["pt_low"] = low
    return out
