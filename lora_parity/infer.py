"""``lora-parity infer``: one text-to-image run on either backend, written as a PNG.

Both backends start from the same noise (``--latents``, default the built-in tiny
noise), run diffusers' Euler schedule with classifier-free guidance, and convert
their float image to uint8 with the same function (:func:`lora_parity.sampling.to_uint8`),
so the two PNGs can be compared pixel for pixel.

The MindSpore side tokenizes with the pipeline folder's own CLIP tokenizers
(``transformers.CLIPTokenizer.from_pretrained(DIR/tokenizer[_2])``, nothing else
of the pipeline is loaded), padded to ``model_max_length`` as the pipeline does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lora_parity.errors import LoraParityError
from lora_parity.sampling import to_uint8
from lora_parity.sides.inputs import default_size_cond, read_latents, vae_scale_factor  # noqa: F401  (re-exported)

BACKENDS = ("ms", "pt", "mindone")  # ms: the port; mindone: mindone.diffusers (its own environment)
DEFAULT_STEPS = 4
DEFAULT_GUIDANCE = 5.0


def tokenize(pipeline_dir: str | Path, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (1, 77) int64 for both SDXL tokenizers, as ``StableDiffusionXLPipeline.encode_prompt`` makes them."""
    from lora_parity.sides.tokens import token_ids

    ids = token_ids(pipeline_dir, prompt)
    return ids["input_ids"], ids["input_ids_2"]


def generate(backend: str, pt_base: str | Path | None = None, *, base: str | None = None, variant=None,
             cache=None, ms_base=None, ms_lora=None, pt_lora=None, prompt: str | None = None,
             latents: np.ndarray | None = None, latents_npy=None, height: int | None = None, width: int | None = None,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, progress: bool = True,
             ms_graph: bool = False) -> tuple[np.ndarray, float]:
    """(float32 image (H, W, 3) in [0, 1], seconds per denoising step) from one backend.

    The same capture as ``compare`` runs (one component at a time), without recording layers.
    """
    import tempfile

    from lora_parity.compare import CompareOptions, check_family, compare_latents, resolve_bases, side_request
    from lora_parity.fixtures.tiny_pipeline import DEFAULT_PROMPT
    from lora_parity.sides.run import run_side

    if backend not in BACKENDS:
        raise LoraParityError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ms" and pt_lora is not None:
        raise LoraParityError("--pt-lora is for --backend pt; give the MindONE LoRA as --ms-lora")
    o = CompareOptions(pt_base=Path(pt_base) if pt_base else None, ms_base=Path(ms_base) if ms_base else None,
                       base=base, variant=variant, cache=Path(cache) if cache else None, ms_lora=ms_lora,
                       pt_lora=pt_lora, latents=latents_npy, height=height, width=width, guidance=guidance,
                       progress=progress, ms_graph=ms_graph)
    b = resolve_bases(o, sides=("pt", "ms") if backend == "ms" else ("pt",))
    check_family(b, "port" if backend == "ms" else backend)
    if latents is None:
        latents = compare_latents(o, b)
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    common = dict(prompt=prompt, steps=int(steps), activations=False, arrays={"latents": latents},
                  size_cond=[list(p) for p in default_size_cond(b.pipeline_dir, latents)])
    with tempfile.TemporaryDirectory(prefix="lora-parity-infer-") as tmp:
        python = None
        if backend == "ms":
            req = side_request(o, b, "ms", lora=str(ms_lora) if ms_lora else None, **common)
        elif backend == "mindone":
            from lora_parity.backends import get_backend

            be = get_backend("mindone")
            python = be.interpreter(None)
            ok, why = be.is_available(python)
            if not ok:
                raise LoraParityError(f"--backend mindone cannot run: {why}")
            lora = Path(pt_lora or ms_lora) if (pt_lora or ms_lora) else None
            if lora is not None and lora.suffix == ".ckpt":  # mindone.diffusers loads PEFT files
                from lora_parity.convert.converter import ConvertOptions, convert

                conv = Path(tmp) / "converted_peft.safetensors"
                convert(ConvertOptions(src=lora, dst=conv, layout=str(b.pipeline_dir)))
                lora = conv
            o.ms_backend = "mindone"
            req = side_request(o, b, "ms", lora=str(lora) if lora else None, **common)
        else:
            lora = Path(pt_lora) if pt_lora else None
            if lora is None and ms_lora is not None:  # convert the MindONE LoRA on the fly
                from lora_parity.convert.converter import ConvertOptions, convert

                lora = Path(tmp) / "converted_pt.safetensors"
                convert(ConvertOptions(src=Path(ms_lora), dst=lora, layout=str(b.pipeline_dir)))
            req = side_request(o, b, "pt", lora=str(lora) if lora else None, **common)
        out = run_side(req, isolate=python is not None and python != sys.executable, python=python)
    return out.images["image"], float(out.meta["seconds_per_step"])


def run_infer(backend: str, pt_base: str | Path | None = None, ms_base=None, ms_lora=None, pt_lora=None,
              prompt: str | None = None, latents_npy=None, steps: int = DEFAULT_STEPS,
              guidance: float = DEFAULT_GUIDANCE, out_png: str | Path = "out.png", progress: bool = True,
              ms_graph: bool = False, force: bool = False, *, base: str | None = None, variant=None, cache=None,
              height: int | None = None, width: int | None = None) -> Path:
    """Generate with ``backend`` ("ms" or "pt") and write the first image to ``out_png``; returns the path."""
    from PIL import Image

    from lora_parity.atomic import atomic_output
    from lora_parity.errors import OutputExistsError

    out = Path(out_png)
    if out.exists() and not force:
        raise OutputExistsError("output exists; pass --force to overwrite it", path=out)
    image, per_step = generate(backend, pt_base, base=base, variant=variant, cache=cache, ms_base=ms_base,
                               ms_lora=ms_lora, pt_lora=pt_lora, prompt=prompt, latents_npy=latents_npy,
                               height=height, width=width, steps=int(steps), guidance=float(guidance),
                               progress=progress, ms_graph=ms_graph)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as fh:
        Image.fromarray(to_uint8(image)).save(fh, format="PNG")
    print(f"{backend}: {int(steps)} steps, {per_step:.3f} s/step -> {out}", file=sys.stderr)
    return out
