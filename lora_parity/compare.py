"""``compare``: run both backends on the same inputs, align every layer, report.

Data flow: fixture/user files -> PyTorch backend (diffusers + load_lora_weights)
and MindSpore backend (SGM cells + MindONE LoRA) -> aligner -> ParityReport.
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lora_parity.parity.align import alignment_for, flow_family, is_flow_folder, unet_alignment  # noqa: F401  (alignment_for: re-exported)
from lora_parity.errors import LoraParityError
from lora_parity.convert.layout import layout_from_pipeline_dir
from lora_parity.parity.metrics import ParityReport
from lora_parity.sides.request import SideRequest, SideResult
from lora_parity.sides.environment import latents_source
from lora_parity.sides.run import run_side
from lora_parity.parity.tolerances import PORT, PORT_EXACT, image_gate, layer_tolerance

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
    lora_scale: float | None = None  # a MindONE SD 1.x / 2.x LoRA .ckpt: its --lora_scale (alpha = scale x rank)
    ema: bool | None = None  # a MindONE file with plain and "ema." LoRA tensors: which set (None: refuse to guess)
    timestep: float = DEFAULT_TIMESTEP
    timesteps: tuple[float, ...] | None = None  # several UNet timesteps (default: (timestep,))
    dtype: str = "F32"
    merge: bool = False  # fold the LoRA into the MindSpore weights instead of running it unmerged
    steps: int | None = None  # denoising steps for the full-image comparison (None: layers only)
    guidance: float | None = None  # None: default_guidance(the base)
    progress: bool = False  # a bar per denoising step on both sides
    image_mae: float | None = None  # override of the image gate's MAE bound (tolerances.image_gate)
    image_max_error: int | None = None  # override of the image gate's max-error bound
    ms_graph: bool = False  # MindSpore graph mode for the image generation (activations run PyNative)
    ms_device: str = "CPU"  # Ascend / CPU / GPU for the MindSpore side; PyTorch runs on pt_device
    pt_device: str = "cpu"
    tol_overrides: dict = field(default_factory=dict)  # dtype -> bound on max|a-b|/max|ref| (replaces the budget)
    mismatch_overrides: dict = field(default_factory=dict)  # dtype -> bound on the mismatch fraction
    rms_overrides: dict = field(default_factory=dict)  # dtype -> bound on ||a-b||/||ref|| (the local rows' third)
    ms_backend: str = PORT  # which MindSpore implementation is judged: port | mindone (also the tolerance rows)
    ms_python: str | None = None  # interpreter for the MindSpore side (default: the backend's, see backends.registry)
    port_numerics: str | None = None  # the port's numerics: "mindone" (default), "diffusers", "mindone:+point" ...
    report_dir: Path | None = None
    pt_format: str = "peft"  # what the .ckpt is converted to for diffusers: peft, or kohya (ComfyUI/A1111 files)
    isolate: bool = True  # each side in its own child process (one model in memory at a time)
    keep_captures: Path | None = None  # save each side's capture here (pt/, ms/, pt_<dtype>/)
    reuse_captures: dict = field(default_factory=dict)  # side -> a kept capture folder made from the same inputs
    replay_only: bool = False  # the MindSpore side replays its blocks only (no chained pass): a quick check
    aesthetic_score: float = 6.0  # refiner conditioning, diffusers' defaults
    negative_aesthetic_score: float = 2.5
    allow_env_drift: bool = False  # bundles: judge despite numerical-environment drift (sides.environment)


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
        from lora_parity.bases import resolve_base

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
    from lora_parity.sides.inputs import read_latents, vae_scale_factor

    if o.latents is not None or (o.height is None and o.width is None and base.default_image_size is None):
        latents = read_latents(o.latents, base.pipeline_dir)
        if o.height is not None or o.width is not None:
            f = vae_scale_factor(base.pipeline_dir)
            want = (o.height or latents.shape[2] * f, o.width or latents.shape[3] * f)
            if want != (latents.shape[2] * f, latents.shape[3] * f):
                raise LoraParityError(f"latents {list(latents.shape)} are not for a {want[0]}x{want[1]} image",
                                      path=o.latents or "built-in latents")
        return latents
    from lora_parity.fixtures.tiny_pipeline import make_latents

    f = vae_scale_factor(base.pipeline_dir)
    h = o.height or base.default_image_size
    w = o.width or base.default_image_size
    if flow_family(base.pipeline_dir):  # SD3 patches 2x2, Flux packs 2x2: latent sides even
        channels = int(_json(base.pipeline_dir / "vae" / "config.json")["latent_channels"])
        if h % (2 * f) or w % (2 * f):
            raise LoraParityError(f"--height/--width must be multiples of {2 * f} for this model, got {h}x{w}")
        return make_latents(0, (1, channels, h // f, w // f))
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
        alpha=o.alpha, ema=o.ema, guidance=o.guidance if o.guidance is not None else default_guidance(base.pipeline_dir),
        merge=o.merge, graph=o.ms_graph, progress=o.progress,
        aesthetic=[o.aesthetic_score, o.negative_aesthetic_score] if base.is_refiner else None,
        device=o.ms_device if side == "ms" else o.pt_device,
        backend=o.ms_backend if side == "ms" else "diffusers",
        port_numerics=o.port_numerics if side == "ms" and o.ms_backend == PORT else None,
        lora_scale=o.lora_scale if side == "ms" and o.ms_backend == PORT else None,
        max_sequence_length=flow_max_sequence_length(base.pipeline_dir) if flow_family(base.pipeline_dir) else None,
        **kw)


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
        if req.refs() and out.meta.get("replay_refs") != req.refs_digest():
            return _replayed_again(o, req, out)
        return out
    from lora_parity.backends import get_backend

    python = get_backend(req.backend_name).interpreter(o.ms_python if req.side == "ms" else None)
    out = run_side(req, isolate=o.isolate or python != sys.executable, python=python)
    if o.keep_captures is not None:
        out.save(Path(o.keep_captures) / name)
    return out


def _replayed_again(o: CompareOptions, req: SideRequest, kept: SideResult) -> SideResult:
    """A kept MindSpore capture whose replay ran on other reference outputs (the PyTorch side changed, e.g. a
    converter fault): its chained outputs do not depend on PyTorch's and stay; the replay runs again on the
    new references (``replay_only``), and its outputs replace the stale ones."""
    from dataclasses import replace as _replace

    from lora_parity.backends import get_backend
    from lora_parity.parity.verdict import LOCAL, NOLORA

    python = get_backend(req.backend_name).interpreter(o.ms_python)
    # SD3 / Flux replay every denoising step of the pipeline's loop: the step count stays (no image: replay-only)
    steps = req.steps if flow_family(Path(req.pipeline_dir)) else None
    fresh = run_side(_replace(req, replay_only=True, steps=steps), isolate=o.isolate or python != sys.executable,
                     python=python)
    acts = {k: v for k, v in kept.acts.items() if not k.startswith((LOCAL, NOLORA))}
    acts.update({k: v for k, v in fresh.acts.items() if k.startswith((LOCAL, NOLORA))})
    meta = dict(kept.meta, replay_refs=fresh.meta.get("replay_refs"), replayed_again=True)
    return SideResult(acts, kept.images, meta)


#: classifier-free guidance when none is given: SDXL's 5; Flux-dev's pipeline default 3.5 (a distilled guidance
#: *embedding*: its sinusoid's argument is guidance x 1000, see docs/comparing.md)
DEFAULT_GUIDANCE = 5.0
FLUX_DEFAULT_GUIDANCE = 3.5


def default_guidance(pipeline_dir: Path) -> float:
    return FLUX_DEFAULT_GUIDANCE if flow_family(pipeline_dir) == "flux" else DEFAULT_GUIDANCE


def flow_max_sequence_length(pipeline_dir: Path) -> int:
    """T5 tokens encoded: the pipeline's own default (SD3 256, Flux 512), capped by the T5 tokenizer's
    ``model_max_length`` (the tiny folders' 16)."""
    family = flow_family(pipeline_dir)
    tok = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    cfg = _json(Path(pipeline_dir) / tok / "tokenizer_config.json")
    return min(256 if family == "sd3" else 512, int(cfg.get("model_max_length") or 512))


def check_family(base: "_Base", backend: str) -> None:
    """The port is MindONE's UNet models (SDXL's ``gm``, SD 1.x / 2.x's LDM): an SD3 / Flux base (a transformer)
    runs on diffusers and mindone.diffusers only."""
    family = flow_family(base.pipeline_dir)
    if backend == PORT and family:
        raise LoraParityError(f"a {family} base: the port runs MindONE's UNet models (SDXL, SD 1.x / 2.x), not a "
                              f"transformer; run mindone.diffusers on it (compare --ms-backend mindone, capture / "
                              f"infer --backend mindone)", path=base.pipeline_dir)


def check_backend(o: CompareOptions) -> None:
    """The MindSpore backend can run here with this dtype; one error before any side runs."""
    from lora_parity.backends import MS_BACKENDS, get_backend

    if o.ms_backend not in MS_BACKENDS:
        raise LoraParityError(f"--ms-backend {o.ms_backend!r}: choose one of {', '.join(MS_BACKENDS)}")
    be = get_backend(o.ms_backend)
    ok, why = be.is_available(o.ms_python)
    if not ok:
        raise LoraParityError(f"--ms-backend {be.name} cannot run: {why}")
    ok, why = be.supports(o.dtype, o.ms_device)
    if not ok:
        raise LoraParityError(f"--dtype {o.dtype}: {why}")


def _lora_for(o: CompareOptions, base: _Base, tmp: Path) -> tuple[str | None, str | None]:
    """(PyTorch side's LoRA, MindSpore side's LoRA) as each backend loads it.

    The port loads the MindONE ``.ckpt``; diffusers and mindone load a PEFT safetensors file:
    ``--pt-lora`` as given, else the ``.ckpt`` converted (for diffusers in ``--pt-format``).
    ``--ms-lora`` may also be a PEFT file for ``--ms-backend mindone`` (a LoRA that
    mindone.diffusers training wrote); then it is both sides' file unless ``--pt-lora`` is given.
    """
    from lora_parity.backends import get_backend
    from lora_parity.convert.converter import ConvertOptions, convert

    fmt = get_backend(o.ms_backend).lora_format
    ms_lora = Path(o.ms_lora) if o.ms_lora else None
    is_ckpt = ms_lora is not None and ms_lora.suffix == ".ckpt"
    if ms_lora is not None and fmt == "mindone-ckpt" and not is_ckpt:
        raise LoraParityError(f"--ms-backend {o.ms_backend} loads a MindONE LoRA (.ckpt)", path=ms_lora)

    def converted(f: str) -> Path:
        out = tmp / f"converted_{f}.safetensors"
        if not out.is_file():
            convert(ConvertOptions(src=ms_lora, dst=out, layout=str(base.pipeline_dir), alpha=o.alpha, fmt=f,
                                   ema=o.ema, lora_scale=o.lora_scale))
        return out

    pt = Path(o.pt_lora) if o.pt_lora else None
    if pt is None and ms_lora is not None:
        pt = converted(o.pt_format) if is_ckpt else ms_lora
    ms = ms_lora
    if ms_lora is not None and fmt == "peft" and is_ckpt:
        ms = converted("peft")
    return (str(pt) if pt else None), (str(ms) if ms else None)


def replay_refs(pt: SideResult, configs_dir: Path, timesteps, backend: str) -> dict[str, np.ndarray]:
    """The PyTorch fp32 capture's aligned outputs as request arrays (``ref/NAME``, by ``backend``'s names):
    the inputs every block of the other side is replayed on."""
    from lora_parity.backends import get_backend
    from lora_parity.sides.request import REF

    naming = get_backend(backend).naming
    steps = (pt.meta.get("inputs") or {}).get("steps")  # SD3 / Flux: the transformer's points per step
    return {REF + a.sgm: pt.acts[a.diffusers]
            for a in alignment_for(Path(configs_dir), timesteps, naming, steps=steps) if a.diffusers in pt.acts}


def run_compare(o: CompareOptions) -> ParityReport:
    """Capture both sides (child processes, one after the other), then :func:`judge` them."""
    base = resolve_bases(o, sides=("pt", "ms") if o.ms_backend == PORT else ("pt",))
    check_family(base, o.ms_backend)
    check_backend(o)
    from lora_parity.fixtures.tiny_pipeline import DEFAULT_PROMPT
    from lora_parity.sides.inputs import default_size_cond

    prompt = o.prompt if o.prompt is not None else DEFAULT_PROMPT
    latents = compare_latents(o, base)
    size_cond = [list(p) for p in default_size_cond(base.pipeline_dir, latents)]
    timesteps = [float(t) for t in (o.timesteps or (o.timestep,))]
    common = dict(prompt=prompt, timesteps=timesteps, size_cond=size_cond, steps=o.steps,
                  arrays={"latents": latents}, noise_source=latents_source(o.latents))
    with tempfile.TemporaryDirectory(prefix="lora-parity-") as tmp:
        pt_lora, ms_lora = _lora_for(o, base, Path(tmp))
        pt = _side(o, "pt", side_request(o, base, "pt", lora=pt_lora, dtype="F32", **common))
        low_common = dict(common, arrays={**common["arrays"], **replay_refs(pt, base.pipeline_dir, timesteps,
                                                                            "diffusers")})
        pt_low = (_side(o, "pt_" + o.dtype.lower(),
                        side_request(o, base, "pt", lora=pt_lora, dtype=o.dtype, **low_common))
                  if o.dtype != "F32" else None)
        inputs = {k[len("_inputs."):]: v for k, v in pt.acts.items() if k.startswith("_inputs.")}
        ms_common = dict(common, arrays={"latents": latents, **inputs, **replay_refs(pt, base.pipeline_dir, timesteps,
                                                                                    o.ms_backend)})
        ms = _side(o, "ms", side_request(o, base, "ms", lora=ms_lora, dtype=o.dtype, replay_only=o.replay_only,
                                         **ms_common))
    allowed = check_reduced_fp32(ms, pt, pt_low, allow=o.allow_env_drift, where=base.pipeline_dir)
    report, images = judge(o, base.pipeline_dir, ms, pt, pt_low)
    if allowed:
        report.meta["env_drift_allowed"] = allowed
    report.meta.update({
        "prompt": prompt, "latents_shape": list(latents.shape),
        "base": o.base if o.base else {"pt_base": str(o.pt_base), "ms_base": str(o.ms_base)},
        "variant": base.variant, "refiner": base.is_refiner,
        "ms_lora": str(o.ms_lora) if o.ms_lora else None, "pt_lora": str(o.pt_lora) if o.pt_lora else "converted",
        "isolated_processes": o.isolate,
    })
    if o.report_dir is not None:
        from lora_parity.parity.report import write_report

        write_report(Path(o.report_dir), report, images)
    return report


def check_reduced_fp32(ms: SideResult, pt: SideResult, pt_low: SideResult | None, *, allow: bool,
                       where: Path) -> list[str] | None:
    """A run (both sides here, one environment) where a side computes with reduced float32 precision while
    claiming fp32 (mindone's float16 attention, TF32 / HF32): printed, and refused unless ``allow``
    (then returned, recorded in report.json).  Bundles get the whole environment check instead."""
    from lora_parity.sides.environment import environment_drift

    envs = {"mindspore": ms.meta.get("numerics_env") or {}, "pytorch": pt.meta.get("numerics_env") or {}}
    if pt_low is not None:
        envs["pytorch_low"] = pt_low.meta.get("numerics_env") or {}
    refused = [d.text for d in environment_drift(envs, []) if d.refuse]
    for text in refused:
        print(f"environment: {text}" + ("" if allow else " [refused]"))
    if refused and not allow:
        raise LoraParityError(f"numerical environments make this comparison meaningless: {'; '.join(refused)} "
                              f"(--dtype fp16 compares at the precision it computes; --allow-env-drift judges "
                              f"anyway)", path=where)
    return refused or None


def judge(o: CompareOptions, configs_dir: Path, ms: SideResult, pt: SideResult,
          pt_low: SideResult | None) -> tuple[ParityReport, dict | None]:
    """Align and judge two captures (made here or anywhere: see :mod:`.bundle`) by the table's gates;
    the report and the two (three) uint8 images when the captures generated images."""
    from lora_parity.backends import get_backend

    backend = ms.meta.get("backend") or o.ms_backend
    timesteps = [float(t) for t in ms.meta["inputs"]["timesteps"]]
    alignment = alignment_for(Path(configs_dir), timesteps, get_backend(backend).naming,
                              steps=ms.meta["inputs"].get("steps"))
    row = gate_row(backend, ms.meta)
    gate = layer_tolerance(o.dtype, o.tol_overrides, row, o.mismatch_overrides)  # the UNet's chained row
    from lora_parity.parity.verdict import Judge

    targets = lora_blocks(ms.meta, pt.meta, Path(configs_dir), get_backend(backend).naming)
    report = Judge(backend=row, dtype=o.dtype, overrides=o.tol_overrides,
                   mismatch_overrides=o.mismatch_overrides, rms_overrides=o.rms_overrides).judge(
        alignment, ms.acts, pt.acts, pt_low.acts if pt_low is not None else None, targets)
    if not report.meta["judged"]["replayed"]:
        report.meta["replay"] = ("not replayed: the MindSpore capture holds no replayed blocks, judged by chained "
                                 "errors only (capture --replay-from PT_BUNDLE replays)")
    sides = {"pytorch": pt.meta, "mindspore": ms.meta}
    if pt_low is not None:
        sides["pytorch_" + o.dtype.lower()] = pt_low.meta
    size_cond = ms.meta["inputs"]["size_cond"]
    report.meta.update({
        "dtype": o.dtype, "timestep": timesteps[0], "timesteps": timesteps,
        "image_size": [int(v) for v in size_cond[2]] if size_cond else None,
        "backend": backend, "reference_backend": pt.meta.get("backend", "diffusers"), "tolerance_row": row,
        # the gate row (with overrides); low-precision runs: the per-layer budgets are in layers[*]
        "tolerance": {**gate.to_dict(), "low_precision_budget": pt_low is not None},
        "mindspore_settings": ms.meta.get("mindspore_settings"),
        "versions": {name: m.get("versions") for name, m in sides.items()},
        "unet_first_forward_seconds": {"mindspore": (ms.meta.get("unet_forward_seconds") or [None])[0],
                                       "pytorch": (pt.meta.get("unet_forward_seconds") or [None])[0]},
        "peak_rss_bytes": {name: m.get("peak_rss_bytes") for name, m in sides.items()},
        "rss_after_bytes": {name: m.get("rss_after_bytes") for name, m in sides.items()},
        "seconds": {name: m.get("seconds") for name, m in sides.items()},
    })
    return report, _judge_images_and_run(o, report, ms, pt, pt_low, row, sides)


def _judge_images_and_run(o: CompareOptions, report: ParityReport, ms: SideResult, pt: SideResult,
                          pt_low: SideResult | None, row: str, sides: dict) -> dict | None:
    """What :func:`judge` checks beyond the layers (:mod:`lora_parity.parity.judge_checks`): the images when
    ``--steps`` were asked (a side without one fails), at least one layer compared; records the aesthetic
    conditioning and each capture's numerical environment (:mod:`lora_parity.sides.environment`)."""
    from lora_parity.parity import judge_checks as jc

    report.meta.update(jc.aesthetic_meta(ms.meta["inputs"].get("aesthetic")))
    report.meta["numerics_env"] = {name: m.get("numerics_env") for name, m in sides.items()}
    if not report.layers:
        report.failures.append(jc.NO_LAYERS)
    # the steps asked of this run: the option, else what the reference (PyTorch fp32) capture was asked; a reused
    # MindSpore capture may hold an image from an earlier run that asked for one
    steps = o.steps if o.steps is not None else pt.meta["inputs"].get("steps")
    holders = {f"MindSpore ({report.meta['backend']})": ms, "PyTorch fp32": pt}
    if pt_low is not None:
        holders[f"PyTorch {o.dtype.lower()}"] = pt_low
    lacking = jc.sides_without_image(steps, {label: side.images for label, side in holders.items()})
    if lacking:
        gate = image_gate(o.dtype, row, ms_device=o.ms_device, pt_device=o.pt_device, mae=o.image_mae,
                          max_error=o.image_max_error)
        per_step = {"mindspore": ms.meta.get("seconds_per_step"), "pytorch": pt.meta.get("seconds_per_step")}
        report.image = jc.missing_image_result(lacking, steps=int(steps), guidance=float(ms.meta["inputs"]["guidance"]),
                                               dtype=o.dtype, gate=gate, seconds_per_step=per_step)
        return None
    if "image" in ms.images and "image" in pt.images:  # both generated (a reused capture may hold one too many)
        return _image_check(o, report, ms, pt, pt_low, row)
    return None


def lora_blocks(ms_meta: dict, pt_meta: dict, configs_dir: Path, naming: str) -> set[str]:
    """The aligned blocks holding a module of the LoRA file (by the MindSpore side's names, no timestep
    suffix): the blocks whose LoRA effect is judged.  From the modules each side read from its own file
    (``meta["lora_modules"]``, SGM names, taken from the file itself, not from what loaded)."""
    from lora_parity.parity.align import block_of

    modules = set(ms_meta.get("lora_modules") or ()) | set(pt_meta.get("lora_modules") or ())
    sgm = alignment_for(Path(configs_dir), [None], "sgm")
    named = alignment_for(Path(configs_dir), [None], naming)
    by_sgm = {a.sgm: b.sgm for a, b in zip(sgm, named)}
    return {by_sgm[a.sgm] for a in (block_of(m, sgm) for m in modules) if a is not None}


def gate_row(backend: str, ms_meta: dict) -> str:
    """The tolerance rows a capture is judged by: the backend's, or ``port-exact`` for the port run with
    diffusers-exact numerics (``--port-numerics diffusers``, every MindONE point off)."""
    nx = (ms_meta.get("mindspore_settings") or {}).get("port_numerics") or {}
    if backend == PORT and nx.get("mode") == "diffusers" and not nx.get("mindone_points"):
        return PORT_EXACT
    return backend


def _image_check(o: CompareOptions, report: ParityReport, ms: SideResult, pt: SideResult,
                 pt_low: SideResult | None, backend: str) -> dict[str, np.ndarray]:
    """Full-image metrics of the two generated images; recorded in the report, part of pass/fail.

    fp32: MindSpore's image against PyTorch's.  fp16/bf16: both sides generate in that dtype
    and MindSpore's image is judged against PyTorch's fp32 image (the reference); PyTorch's own
    low-precision image error is recorded next to it.
    """
    from lora_parity.parity.image_metrics import image_metrics
    from lora_parity.parity.judge_checks import nonfinite_pixels, nonfinite_reason
    from lora_parity.sampling import to_uint8
    floats = {f"MindSpore ({report.meta.get('backend', backend)})": ms.images["image"],
              "PyTorch fp32": pt.images["image"]}
    nonfinite = nonfinite_pixels(floats)  # before to_uint8, which turns NaN into 0 on both sides
    ms_img, pt_img = to_uint8(ms.images["image"]), to_uint8(pt.images["image"])
    m = image_metrics(ms_img, pt_img)
    steps = pt.meta["inputs"]["steps"]
    guidance = pt.meta["inputs"]["guidance"]
    gate = image_gate(o.dtype, backend, ms_device=o.ms_device, pt_device=o.pt_device, mae=o.image_mae,
                      max_error=o.image_max_error)
    passed = m.mae < gate["mae"] and (gate["max_error"] is None or m.max_error <= gate["max_error"]) and not nonfinite
    per_step = {"mindspore": float(ms.meta["seconds_per_step"]), "pytorch": float(pt.meta["seconds_per_step"])}
    report.image = {**m.to_dict(), "mae_threshold": gate["mae"], "max_error_threshold": gate["max_error"],
                    "gate": gate, "passed": passed,
                    "steps": steps, "guidance": guidance, "dtype": o.dtype, "reference": "pytorch fp32",
                    "seconds_per_step": per_step,
                    "title": f"{steps} steps, guidance {guidance:g}: MAE {m.mae:.3f}, PSNR {m.psnr:.1f} dB, "
                             f"SSIM {m.ssim:.4f}"}
    if nonfinite:
        report.image.update(nonfinite_pixels=nonfinite,
                            reason=nonfinite_reason(nonfinite, {k: int(np.size(v)) for k, v in floats.items()}))
    out = {"ms": ms_img, "pt": pt_img}
    if pt_low is not None and "image" in pt_low.images:
        low = to_uint8(pt_low.images["image"])
        report.image["pytorch_low_precision_vs_reference"] = image_metrics(low, pt_img).to_dict()
        report.image["seconds_per_step"]["pytorch_" + o.dtype.lower()] = float(pt_low.meta["seconds_per_step"])
        out["pt_low"] = low
    return out


# ---------------------------------------------------------------- bundles (see lora_parity.sides.bundle)


def run_capture(o: CompareOptions, backend: str, out: Path, *, force: bool = False,
                replay_from: Path | None = None) -> Path:
    """``lora-parity capture``: one backend's capture of the inputs ``compare`` would use, as a bundle.

    ``replay_from`` (a MindSpore backend): a diffusers fp32 bundle whose inputs this capture runs and whose
    outputs every block is replayed on (local errors and the LoRA's effect travel in the bundle), so a
    machine with the MindSpore weights (an Ascend host) replays a GPU host's capture."""
    from lora_parity.backends import get_backend
    from lora_parity.sides.bundle import write_bundle
    from lora_parity.fixtures.tiny_pipeline import DEFAULT_PROMPT
    from lora_parity.sides.inputs import default_size_cond

    try:
        be = get_backend(backend)
    except ValueError as exc:
        raise LoraParityError(str(exc)) from None
    if Path(out).exists() and not force:  # before minutes of work
        raise LoraParityError("output exists (use --force to replace it)", path=out)
    python = be.interpreter(o.ms_python if be.side == "ms" else None)
    ok, why = be.is_available(python)
    if not ok:
        raise LoraParityError(f"--backend {be.name} cannot run: {why}")
    ok, why = be.supports(o.dtype, o.ms_device if be.side == "ms" else "CPU")
    if not ok:
        raise LoraParityError(f"--dtype {o.dtype}: {why}")
    base = resolve_bases(o, sides=("ms",) if be.name == PORT else ("pt",))
    check_family(base, be.name)
    prompt = o.prompt if o.prompt is not None else DEFAULT_PROMPT
    latents = compare_latents(o, base)
    size_cond = [list(p) for p in default_size_cond(base.pipeline_dir, latents)]
    timesteps = [float(t) for t in (o.timesteps or (o.timestep,))]
    extra_arrays, replayed_on = {}, None
    if replay_from is not None:
        from lora_parity.sides.bundle import read_bundle

        if be.side != "ms":
            raise LoraParityError("--replay-from: only a MindSpore backend (port, mindone) replays on a bundle")
        ref = read_bundle(Path(replay_from))
        if ref.manifest["side"] != "pt" or ref.dtype != "F32":
            raise LoraParityError("--replay-from must be a diffusers capture in fp32 (the reference)",
                                  path=replay_from)
        r = ref.request
        prompt, timesteps, size_cond, latents = r.prompt, [float(t) for t in r.timesteps], r.size_cond, \
            r.arrays["latents"]
        o = replace(o, steps=r.steps, guidance=r.guidance)
        extra_arrays = {k[len("_inputs."):]: v for k, v in ref.result.acts.items() if k.startswith("_inputs.")}
        extra_arrays.update(replay_refs(ref.result, ref.configs, timesteps, be.name))
        replayed_on = str(replay_from)
    given = o.ms_lora or o.pt_lora
    with tempfile.TemporaryDirectory(prefix="lora-parity-capture-") as tmp:
        lora = Path(given) if given else None
        if lora is not None and be.lora_format == "mindone-ckpt" and lora.suffix != ".ckpt":
            raise LoraParityError(f"--backend {be.name} loads a MindONE LoRA (.ckpt)", path=lora)
        if lora is not None and be.lora_format == "peft" and lora.suffix == ".ckpt":
            from lora_parity.convert.converter import ConvertOptions, convert

            fmt = o.pt_format if be.name == "diffusers" else "peft"
            conv = Path(tmp) / f"converted_{fmt}.safetensors"
            convert(ConvertOptions(src=lora, dst=conv, layout=str(base.pipeline_dir), alpha=o.alpha, fmt=fmt,
                                   ema=o.ema, lora_scale=o.lora_scale))
            lora = conv
        o_side = o if be.side == "ms" else CompareOptions(**{**o.__dict__, "ms_backend": PORT})
        req = side_request(o_side, base, be.side, lora=str(lora) if lora else None, dtype=o.dtype, prompt=prompt,
                           timesteps=timesteps, size_cond=size_cond, steps=o.steps,
                           arrays={"latents": latents, **extra_arrays},
                           replay_only=o.replay_only and bool(extra_arrays),
                           noise_source=(f"given latents (the request of bundle {replayed_on})" if replayed_on
                                         else latents_source(o.latents)))
        req.backend = be.name
        result = run_side(req, isolate=True, python=python)
        return write_bundle(Path(out), req, result, base=o.base or str(base.pipeline_dir),
                            lora=str(given) if given else None, force=force, replayed_on=replayed_on)


def compare_bundles(o: CompareOptions, ms_dir: Path, pt_dir: Path, pt_low_dir: Path | None = None) -> ParityReport:
    """Judge a MindSpore-side bundle against a PyTorch fp32 bundle (and, for fp16/bf16, PyTorch's bundle in
    that dtype), after checking they ran identical inputs; the same judge as :func:`run_compare`."""
    from dataclasses import replace

    from lora_parity.sides.bundle import check_same_inputs, read_bundle

    ms, pt = read_bundle(ms_dir), read_bundle(pt_dir)
    if ms.manifest["side"] != "ms":
        raise LoraParityError(f"--ms-bundle holds a {ms.backend} capture, not a MindSpore one", path=ms_dir)
    if pt.manifest["side"] != "pt" or pt.dtype != "F32":
        raise LoraParityError("--pt-bundle must be a diffusers capture in fp32 (the reference)", path=pt_dir)
    check_same_inputs(ms, pt)
    low = None
    if ms.dtype != "F32":
        if pt_low_dir is None:
            raise LoraParityError(f"a {ms.dtype} MindSpore bundle is judged with PyTorch's own {ms.dtype} error: "
                                  f"give --pt-low-bundle (a diffusers capture with --dtype {ms.dtype.lower()})")
        low = read_bundle(pt_low_dir)
        if low.manifest["side"] != "pt" or low.dtype != ms.dtype:
            raise LoraParityError(f"--pt-low-bundle must be a diffusers capture in {ms.dtype}", path=pt_low_dir)
        check_same_inputs(low, pt)
    o = replace(o, dtype=ms.dtype, ms_backend=ms.backend, ms_device=ms.manifest["device"],
                pt_device=pt.manifest["device"])
    from lora_parity.sides.environment import check_bundle_drift

    allowed = check_bundle_drift(ms.result.meta, pt.result.meta, low.result.meta if low else None,
                                 allow=o.allow_env_drift, where=f"{ms_dir} vs {pt_dir}")
    report, images = judge(o, ms.configs, ms.result, pt.result, low.result if low else None)
    if allowed is not None:
        report.meta["env_drift_allowed"] = allowed
    report.meta.update({"prompt": ms.request.prompt, "latents_shape": list(ms.request.arrays["latents"].shape),
                        "base": ms.manifest["base"], "ms_lora": ms.manifest["lora"], "pt_lora": pt.manifest["lora"],
                        "bundles": {"mindspore": str(ms_dir), "pytorch": str(pt_dir),
                                    **({"pytorch_low": str(pt_low_dir)} if low else {})}})
    if o.report_dir is not None:
        from lora_parity.parity.report import write_report

        write_report(Path(o.report_dir), report, images)
    return report
