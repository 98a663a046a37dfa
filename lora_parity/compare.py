"""``compare``: run both backends on the same inputs, align every layer, report.

Data flow: fixture/user files -> PyTorch backend (diffusers + load_lora_weights)
and MindSpore backend (SGM cells + MindONE LoRA) -> aligner -> ParityReport.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .align import conditioning_alignment, text_alignment, unet_alignment, vae_alignment
from .errors import LoraParityError
from .layout import layout_from_pipeline_dir
from .parity import ParityReport, compare, compare_low_precision
from .tolerances import layer_tolerance

DEFAULT_TIMESTEP = 500.0


@dataclass
class CompareOptions:
    pt_base: Path
    ms_base: Path
    ms_lora: Path | None = None
    pt_lora: Path | None = None
    latents: Path | None = None
    prompt: str | None = None
    alpha: float | None = None
    timestep: float = DEFAULT_TIMESTEP
    dtype: str = "F32"
    merge: bool = False  # fold the LoRA into the MindSpore weights instead of running it unmerged
    steps: int | None = None  # denoising steps for the full-image comparison (None: layers only)
    guidance: float = 5.0
    progress: bool = False  # a bar per denoising step on both sides
    image_mae: float | None = None  # override of tolerances.IMAGE_MAE_MAX
    ms_graph: bool = False  # MindSpore graph mode for the image generation (activations run PyNative)
    ms_device: str = "CPU"  # Ascend / CPU / GPU for the MindSpore side; PyTorch runs on pt_device
    pt_device: str = "cpu"
    tol_overrides: dict = field(default_factory=dict)
    report_dir: Path | None = None


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_inputs(o: CompareOptions) -> None:
    if not (Path(o.pt_base) / "model_index.json").is_file():
        raise LoraParityError("not a diffusers pipeline folder (no model_index.json)", path=o.pt_base)
    for p in (o.ms_base, o.ms_lora, o.pt_lora, o.latents):
        if p is not None and not Path(p).is_file():
            raise LoraParityError("no such file", path=p)


def ms_side(o: CompareOptions, ids1, ids2, latents, size_cond) -> dict[str, np.ndarray]:
    """Build the SGM model in MindSpore, load base + MindONE LoRA, capture every block."""
    from .backends.mindspore_backend import MindSporeBackend
    from .device import use_device

    settings = use_device(o.ms_device)
    be = MindSporeBackend(o.pt_base, o.ms_base, o.ms_lora, o.alpha, dtype=o.dtype, merge=o.merge, graph=o.ms_graph)
    acts, seconds = be.activations(ids1, ids2, latents, o.timestep, size_cond)
    acts["_unet_seconds"] = np.array(seconds)
    acts["_settings"] = settings
    if o.steps:
        image, per_step = be.generate_float(ids1, ids2, latents, o.steps, o.guidance, size_cond, progress=o.progress)
        acts["_image"], acts["_seconds_per_step"] = image, per_step
    return acts


def pt_side(o: CompareOptions, pt_lora: Path | None, prompt: str, latents, size_cond, dtype: str = "F32"):
    import torch

    from .backends.torch_backend import TorchBackend

    be = TorchBackend(o.pt_base, lora=pt_lora, device=o.pt_device, dtype={"F32": torch.float32, "F16": torch.float16,
                                                     "BF16": torch.bfloat16}[dtype])
    ids1, ids2 = be.tokenize(prompt)
    acts = dict(be.text_encoder_activations(input_ids=ids1, input_ids_2=ids2).values)
    embeds, pooled = be.encode_prompt(input_ids=ids1, input_ids_2=ids2)
    time_ids = be.add_time_ids(*size_cond)
    t0 = time.perf_counter()
    acts.update(be.unet_activations(latents, o.timestep, embeds, pooled, time_ids).values)
    unet_s = time.perf_counter() - t0
    acts.update(be.vae_decode_activations(latents).values)
    with torch.no_grad():
        tproj = be.unet.add_time_proj(torch.as_tensor(time_ids).flatten()).reshape(time_ids.shape[0], -1)
    acts["conditioning.prompt_embeds"] = np.asarray(embeds)
    acts["conditioning.add_embedding_input"] = np.concatenate([np.asarray(pooled), tproj.numpy()], axis=-1)
    if o.steps and dtype == "F32":
        acts["_image"] = be.generate_float(prompt, latents, o.steps, o.guidance, progress=o.progress)
        acts["_seconds_per_step"] = be.last_seconds_per_step
    return acts, ids1, ids2, unet_s


def run_compare(o: CompareOptions) -> ParityReport:
    _check_inputs(o)
    if o.dtype != "F32":
        from .backends.mindspore_backend import MindSporeBackend

        ok, why = MindSporeBackend.supports(o.dtype)
        if not ok:
            raise LoraParityError(f"--dtype {o.dtype}: {why}")
    from .fixtures.tiny_pipeline import DEFAULT_PROMPT

    prompt = o.prompt if o.prompt is not None else DEFAULT_PROMPT
    from .infer import default_size_cond, read_latents

    latents = read_latents(o.latents, o.pt_base)

    size_cond = default_size_cond(o.pt_base, latents)
    with tempfile.TemporaryDirectory(prefix="lora-parity-") as tmp:
        pt_lora = Path(o.pt_lora) if o.pt_lora else None
        if pt_lora is None and o.ms_lora is not None:
            from .convert import ConvertOptions, convert

            pt_lora = Path(tmp) / "converted_pt.safetensors"
            convert(ConvertOptions(src=Path(o.ms_lora), dst=pt_lora, layout=str(o.pt_base), alpha=o.alpha))
        pt, ids1, ids2, pt_unet_s = pt_side(o, pt_lora, prompt, latents, size_cond)
        pt_low = pt_side(o, pt_lora, prompt, latents, size_cond, o.dtype)[0] if o.dtype != "F32" else None
    ms_acts = ms_side(o, ids1, ids2, latents, size_cond)
    layout = layout_from_pipeline_dir(Path(o.pt_base))
    vae_blocks = len(_json(Path(o.pt_base) / "vae" / "config.json")["block_out_channels"])
    alignment = (text_alignment(layout) + conditioning_alignment() + unet_alignment(layout)
                 + vae_alignment(vae_blocks))
    if pt_low is None:
        report = compare(alignment, ms_acts, pt, layer_tolerance(o.dtype, o.tol_overrides), o.dtype)
    else:
        report = compare_low_precision(alignment, ms_acts, pt_low, pt, o.dtype)
    report.meta.update({
        "dtype": o.dtype, "timestep": o.timestep, "prompt": prompt, "latents_shape": list(latents.shape),
        "ms_lora": str(o.ms_lora) if o.ms_lora else None, "pt_lora": str(o.pt_lora) if o.pt_lora else "converted",
        "tolerance": layer_tolerance(o.dtype, o.tol_overrides).__dict__,
        "mindspore_settings": ms_acts["_settings"],
        "unet_first_forward_seconds": {"mindspore": float(ms_acts["_unet_seconds"]), "pytorch": pt_unet_s},
    })
    images = None
    if o.steps:
        images = _image_check(o, report, ms_acts, pt)
    if o.report_dir is not None:
        from .report import write_report

        write_report(Path(o.report_dir), report, images)
    return report


def _image_check(o: CompareOptions, report: ParityReport, ms_acts: dict, pt: dict) -> dict[str, np.ndarray]:
    """Full-image metrics of the two generated images; recorded in the report, part of pass/fail."""
    from .image_metrics import image_metrics
    from .sampling import to_uint8
    from .tolerances import IMAGE_MAE_MAX

    ms_img, pt_img = to_uint8(ms_acts["_image"]), to_uint8(pt["_image"])
    m = image_metrics(ms_img, pt_img)
    threshold = IMAGE_MAE_MAX if o.image_mae is None else float(o.image_mae)
    report.image = {**m.to_dict(), "mae_threshold": threshold, "passed": m.mae < threshold,
                    "steps": o.steps, "guidance": o.guidance,
                    "seconds_per_step": {"mindspore": float(ms_acts["_seconds_per_step"]),
                                         "pytorch": float(pt["_seconds_per_step"])},
                    "title": f"{o.steps} steps, guidance {o.guidance:g}: MAE {m.mae:.3f}, PSNR {m.psnr:.1f} dB, "
                             f"SSIM {m.ssim:.4f}"}
    return {"ms": ms_img, "pt": pt_img}
