"""``lora-parity`` command line: argument parsing and one-line errors, nothing else.

Heavy imports (torch, mindspore, diffusers) happen inside the commands that
need them, so ``convert`` starts fast and runs where neither is installed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_parity.errors import LoraParityError

PROG = "lora-parity"


def _cmd_convert(args: argparse.Namespace) -> int:
    from lora_parity.convert.converter import ConvertOptions, convert

    report = convert(ConvertOptions(
        src=Path(args.src), dst=Path(args.output) if args.output else None, fmt=args.format,
        layout=args.layout, alpha=args.alpha, dtype=args.dtype, force=args.force, strict=args.strict,
        progress=not args.quiet and sys.stderr.isatty() or args.progress, ema=args.ema,
        lora_scale=args.lora_scale,
    ))
    if not args.quiet:
        print(report.summary())
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from lora_parity.convert.keys_table import keys_table

    rows = keys_table(Path(args.src), layout=args.layout, fmt=args.format, strict=args.strict)
    out = sys.stdout
    width = max((len(r[0]) for r in rows), default=10)
    for src_name, dst_name, shape in rows:
        out.write(f"{src_name:<{width}}  {dst_name}  {shape}\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _quiet_framework_loading()
    from lora_parity.demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None)


def _cmd_fixture(args: argparse.Namespace) -> int:
    from lora_parity.fixtures.families import check_family, write_family_fixture

    check_family(args.family)  # a bad name fails before any framework loads
    _quiet_framework_loading()
    print(write_family_fixture(Path(args.dir), args.family, seed=args.seed, force=args.force).summary())
    return 0


def _quiet_framework_loading() -> None:
    """transformers/diffusers loading bars and import warnings are noise here; denoising bars stay.

    Runs first in every command that loads a model (fixture, compare, infer, demo), before
    either framework is imported; the side processes of ``compare`` inherit its environment
    and call the same function.
    """
    from lora_parity.sides.run import quiet_frameworks

    quiet_frameworks()


def _cmd_compare(args: argparse.Namespace) -> int:
    if args.in_process:
        _quiet_framework_loading()
    else:  # the sides run in children (the PyTorch one quiets its frameworks itself)
        from lora_parity.sides.run import quiet_environment

        quiet_environment()
    from lora_parity.compare import CompareOptions, run_compare
    from lora_parity.convert.tensor import DTYPE_ALIASES

    overrides = {"F32": args.tol_f32, "F16": args.tol_f16, "BF16": args.tol_bf16}
    mismatch = {"F32": args.mismatch_f32, "F16": args.mismatch_f16, "BF16": args.mismatch_bf16}
    rms = {"F32": args.rms_f32, "F16": args.rms_f16, "BF16": args.rms_bf16}
    if args.ms_bundle or args.pt_bundle:
        if not (args.ms_bundle and args.pt_bundle):
            raise LoraParityError("give both --ms-bundle and --pt-bundle")
        from lora_parity.compare import compare_bundles

        report = compare_bundles(CompareOptions(
            tol_overrides=overrides, mismatch_overrides=mismatch, rms_overrides=rms, image_mae=args.image_mae,
            image_max_error=args.image_max_error, report_dir=Path(args.report) if args.report else None,
            allow_env_drift=args.allow_env_drift),
            Path(args.ms_bundle), Path(args.pt_bundle), Path(args.pt_low_bundle) if args.pt_low_bundle else None)
        return _print_report(args, report)
    report = run_compare(CompareOptions(
        pt_base=Path(args.pt_base) if args.pt_base else None, ms_base=Path(args.ms_base) if args.ms_base else None,
        base=args.base, variant=args.variant, cache=Path(args.cache) if args.cache else None,
        height=args.height, width=args.width, timesteps=_timesteps(args.timesteps, args.timestep),
        isolate=not args.in_process, pt_format=args.pt_format,
        ms_lora=Path(args.ms_lora) if args.ms_lora else None,
        pt_lora=Path(args.pt_lora) if args.pt_lora else None,
        latents=Path(args.latents) if args.latents else None, prompt=args.prompt, alpha=args.alpha,
        timestep=args.timestep, tol_overrides=overrides, mismatch_overrides=mismatch, rms_overrides=rms,
        steps=args.steps,
        guidance=args.guidance, image_mae=args.image_mae, image_max_error=args.image_max_error, ms_graph=args.ms_graph, ms_device=args.ms_device, pt_device=args.pt_device,
        progress=args.steps is not None and not args.quiet, dtype=DTYPE_ALIASES[args.dtype], merge=args.ms_merge,
        ms_backend=args.ms_backend, ms_python=args.ms_python, ema=args.ema, port_numerics=args.port_numerics,
        replay_only=args.replay_only, report_dir=Path(args.report) if args.report else None,
        lora_scale=args.lora_scale, allow_env_drift=args.allow_env_drift))
    return _print_report(args, report)


def _print_report(args: argparse.Namespace, report) -> int:
    print(report.layers_table() if args.all_layers else report.table())
    if args.report:
        print(f"report: {Path(args.report) / 'report.json'}")
    return 0 if report.passed else 1


def _cmd_capture(args: argparse.Namespace) -> int:
    from lora_parity.sides.run import quiet_environment

    quiet_environment()
    from lora_parity.compare import CompareOptions, run_capture
    from lora_parity.convert.tensor import DTYPE_ALIASES

    lora = Path(args.lora) if args.lora else None
    out = run_capture(CompareOptions(
        pt_base=Path(args.pt_base) if args.pt_base else None, ms_base=Path(args.ms_base) if args.ms_base else None,
        base=args.base, variant=args.variant, cache=Path(args.cache) if args.cache else None,
        height=args.height, width=args.width, timesteps=_timesteps(args.timesteps, args.timestep),
        ms_lora=lora if lora is not None and args.backend != "diffusers" else None,
        pt_lora=lora if lora is not None and args.backend == "diffusers" else None, pt_format=args.pt_format,
        latents=Path(args.latents) if args.latents else None, prompt=args.prompt, alpha=args.alpha,
        timestep=args.timestep, steps=args.steps, guidance=args.guidance, ms_graph=args.ms_graph,
        ms_device=args.ms_device, pt_device=args.pt_device, progress=args.steps is not None and not args.quiet,
        dtype=DTYPE_ALIASES[args.dtype], merge=args.ms_merge, ms_python=args.ms_python, ema=args.ema,
        port_numerics=args.port_numerics, replay_only=args.replay_only, lora_scale=args.lora_scale),
        args.backend, Path(args.output), force=args.force, replay_from=Path(args.replay_from) if args.replay_from else None)
    print(f"bundle: {out}")
    return 0


def _timesteps(text: str | None, single: float) -> tuple[float, ...]:
    if not text:
        return (single,)
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise LoraParityError(f"--timesteps takes comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= t < 1000 for t in values):
        raise LoraParityError(f"--timesteps must be in [0, 1000), got {text!r}")
    return values


def _add_numerics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port-numerics", metavar="SPEC",
                   help="the port's arithmetic where MindONE's gm and diffusers differ: mindone (default: as gm "
                        "computes, e.g. timestep frequencies with MindSpore's exp), diffusers (diffusers-exact, for "
                        "diagnosis), or MODE:+point,-point (e.g. mindone:+clip_l_activation, gm's tanh-GELU CLIP-L)")


def _add_ema_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="ema", action="store_true", default=None,
                   help="a MindONE checkpoint with both sets: use the EMA copies ('ema.' names)")
    g.add_argument("--no-ema", dest="ema", action="store_false", help="... or the trained (non-EMA) tensors")


def _add_base_args(p: argparse.ArgumentParser, *, pair_help: bool = True) -> None:
    p.add_argument("--base", metavar="SPEC",
                   help="the base model for both sides: a diffusers pipeline folder, an official single-file "
                        "checkpoint (sd_xl_base_1.0.safetensors), or random:sdxl-base|sdxl-refiner|tiny[:SEED] "
                        "(generated once into --cache)")
    p.add_argument("--variant", help="diffusers weight variant of a folder base, e.g. fp16 (*.fp16.safetensors)")
    p.add_argument("--cache", help="folder for generated / materialised bases (default: ~/.cache/lora-parity)")
    p.add_argument("--height", type=int, help="image height (default: the model's; README uses 256 on CPU)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")


def _cmd_infer(args: argparse.Namespace) -> int:
    _quiet_framework_loading()
    from lora_parity.infer import run_infer

    out = run_infer(args.backend, Path(args.pt_base) if args.pt_base else None,
                    base=args.base, variant=args.variant, cache=args.cache, height=args.height, width=args.width,
                    ms_base=Path(args.ms_base) if args.ms_base else None,
                    ms_lora=Path(args.ms_lora) if args.ms_lora else None,
                    pt_lora=Path(args.pt_lora) if args.pt_lora else None,
                    prompt=args.prompt, latents_npy=Path(args.latents) if args.latents else None,
                    steps=args.steps, guidance=args.guidance, out_png=Path(args.output),
                    progress=not args.quiet, ms_graph=args.ms_graph, force=args.force)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=(
        "Convert MindSpore (MindONE) SDXL LoRA checkpoints to PyTorch and back, "
        "and prove both frameworks compute the same model."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a LoRA between MindONE .ckpt and PEFT/kohya safetensors",
                       description="Convert a LoRA. A MindONE .ckpt becomes PEFT (default) or kohya "
                                   "safetensors; a PEFT or kohya file becomes a MindONE .ckpt. --format kohya "
                                   "with a .ckpt output writes the names MindONE's sd-scripts port uses. SD3 / "
                                   "Flux (no MindONE .ckpt: mindone.diffusers saves PEFT): PEFT <-> kohya.")
    c.add_argument("src", help="input LoRA (.ckpt, .safetensors; .bin/.pt read with weights_only)")
    c.add_argument("-o", "--output", help="output file (default: <src stem>_pt.safetensors or <src stem>_ms.ckpt "
                                          "beside the source, SD3 / Flux kohya <src stem>_kohya.safetensors; "
                                          ".bin/.pt writes a torch pickle)")
    c.add_argument("--format", choices=("peft", "kohya", "ms"),
                   help="output format (default: peft for a MindONE input, ms for a PyTorch input; SD3 / Flux: "
                        "kohya for PEFT, peft for kohya)")
    c.add_argument("--layout", help="sdxl-base, sdxl-refiner, sd15, sd21, sd3, flux, tiny-sd3, tiny-flux, a diffusers "
                                    "unet / transformer config.json or pipeline folder "
                                    "(default: detected from the checkpoint's names and shapes)")
    c.add_argument("--alpha", type=float, help="LoRA alpha (MindONE .ckpt stores none; default: rank, scale 1)")
    c.add_argument("--lora-scale", type=float,
                   help="MindONE SD 1.x / 2.x LoRA (lora_down / lora_up .ckpt): the --lora_scale it was run with "
                        "(alpha = scale x rank; default 1, MindONE's default)")
    c.add_argument("--dtype", default="keep", choices=("keep", "fp32", "fp16", "bf16"), help="output dtype")
    c.add_argument("--force", action="store_true", help="overwrite an existing output")
    c.add_argument("--strict", dest="strict", action="store_true", default=True,
                   help="unmapped LoRA keys are an error (default)")
    c.add_argument("--no-strict", dest="strict", action="store_false", help="skip and list unmapped LoRA keys")
    e = c.add_mutually_exclusive_group()
    e.add_argument("--ema", dest="ema", action="store_true", default=None,
                   help="a MindONE checkpoint with both sets: convert the EMA copies ('ema.' names)")
    e.add_argument("--no-ema", dest="ema", action="store_false",
                   help="a MindONE checkpoint with both sets: convert the trained (non-EMA) LoRA tensors")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    c.add_argument("--progress", action="store_true", help="show a progress bar even when not on a terminal")
    c.set_defaults(func=_cmd_convert)

    k = sub.add_parser("keys", help="print the name mapping table (source name, target name, shape)",
                       description="Print how each LoRA tensor of SRC maps: source name, target name, shape.")
    k.add_argument("src", help="input LoRA file")
    k.add_argument("--format", choices=("peft", "kohya", "ms"), help="target naming (default as in convert)")
    k.add_argument("--layout", help="as in convert")
    k.add_argument("--no-strict", dest="strict", action="store_false", default=True)
    k.set_defaults(func=_cmd_keys)

    f = sub.add_parser("fixture", help="write a tiny pipeline and a LoRA of one family (default: the built-in "
                                       "tiny SDXL, both layouts, latents and a prompt)",
                       description="sdxl: DIR/pt_base/ (diffusers), DIR/ms_base.ckpt (SGM), DIR/ms_lora.ckpt, "
                                   "DIR/latents.npy, DIR/prompt.txt. sd1, sd2, sd3, flux: DIR/pt_base/ (diffusers, "
                                   "fp16 variant) and DIR/pytorch_lora_weights.safetensors (PEFT, the modules "
                                   "mindone.diffusers' trainers target), plus DIR/ms_lora.ckpt (MindONE LDM) for "
                                   "sd1 / sd2. Generated, never downloaded; written whole or not at all.")
    f.add_argument("dir", help="output folder")
    f.add_argument("--family", default="sdxl", metavar="F", help="sdxl (default), sd1, sd2, sd3 or flux")
    f.add_argument("--seed", type=int, default=0, help="seed for weights, LoRA and latents")
    f.add_argument("--force", action="store_true", help="replace outputs already in DIR")
    f.set_defaults(func=_cmd_fixture)

    m = sub.add_parser("compare", help="run MindSpore and PyTorch on the same inputs and compare every layer",
                       description="Exit 0 on parity, 1 on a parity failure, 2 on bad input.")
    _add_base_args(m)
    m.add_argument("--pt-base", help="an explicit pair instead of --base: a diffusers SDXL pipeline folder ...")
    m.add_argument("--ms-base", help="... and the same base weights as a MindSpore .ckpt (SGM names)")
    m.add_argument("--ms-backend", choices=("port", "mindone"), default="port",
                   help="the MindSpore implementation judged: port (this project's SGM port, MindONE .ckpt LoRA; "
                        "default) or mindone (mindone.diffusers' own pipeline and LoRA loader)")
    _add_numerics_arg(m)
    m.add_argument("--ms-python", metavar="PATH",
                   help="Python interpreter for the MindSpore side (default for mindone: $LORA_PARITY_MINDONE_PYTHON "
                        "or .venv-mindone)")
    m.add_argument("--ms-bundle", metavar="DIR", help="judge captured bundles instead of running: the MindSpore one ...")
    m.add_argument("--pt-bundle", metavar="DIR", help="... and the diffusers fp32 one (lora-parity capture)")
    m.add_argument("--pt-low-bundle", metavar="DIR",
                   help="for an fp16/bf16 MindSpore bundle: the diffusers capture in that dtype")
    m.add_argument("--allow-env-drift", action="store_true",
                   help="judge bundles whose numerical environments differ in ways that make an fp32 comparison "
                        "meaningless (TF32/HF32 on, another scheduler or VAE upcast), or a run whose MindSpore side "
                        "computes attention in float16 while claiming fp32 (mindone's Flux); recorded in report.json")
    m.add_argument("--ms-lora", help="MindONE LoRA .ckpt (omit to compare the base models); for --ms-backend mindone "
                                     "also a PEFT .safetensors")
    m.add_argument("--pt-lora", help="PyTorch LoRA to compare against (default: convert --ms-lora)")
    _add_ema_args(m)
    m.add_argument("--pt-format", choices=("peft", "kohya"), default="peft",
                   help="convert --ms-lora to this format for diffusers (default peft; kohya tests the file "
                        "ComfyUI/A1111 users get)")
    m.add_argument("--latents", help=".npy latents (N, 4, H, W) (default: built-in seed 0)")
    m.add_argument("--prompt", help="prompt text (default: the built-in prompt)")
    m.add_argument("--alpha", type=float, help="LoRA alpha (default: rank)")
    m.add_argument("--lora-scale", type=float,
                   help="a MindONE SD 1.x / 2.x LoRA .ckpt (lora_down / lora_up): the --lora_scale it runs with "
                        "(alpha = scale x rank; default 1)")
    m.add_argument("--timestep", type=float, default=500.0, help="UNet timestep (default 500)")
    m.add_argument("--timesteps", help="compare the UNet at several timesteps, e.g. 999,500,1")
    m.add_argument("--in-process", action="store_true",
                   help="run both sides in this process (default: one child process per side, so only one "
                        "model is in memory at a time)")
    m.add_argument("--report", help="write report.json (and images) into this folder")
    m.add_argument("--steps", type=int, help="also generate images with N denoising steps and compare them")
    m.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance for --steps (default 5; Flux 3.5, its pipeline's default)")
    m.add_argument("--image-mae", type=float,
                   help="override the full-image MAE bound (0-255; default per dtype and device from the table)")
    m.add_argument("--image-max-error", type=int, help="override the full-image max-error bound (0-255)")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="precision of both runs; fp16/bf16 are judged against the fp32 reference")
    m.add_argument("--ms-device", default="CPU", choices=("CPU", "Ascend", "GPU"), help="MindSpore device (default CPU)")
    m.add_argument("--pt-device", default="cpu", help="torch device for diffusers, e.g. cpu or cuda (default cpu)")
    m.add_argument("--ms-merge", action="store_true", help="fold the LoRA into the MindSpore weights")
    m.add_argument("--ms-graph", action="store_true",
                   help="MindSpore graph mode for image generation (compiled once; same results, faster)")
    m.add_argument("--all-layers", action="store_true", help="print every aligned layer, not one row per component")
    m.add_argument("--replay-only", action="store_true",
                   help="the MindSpore side only replays each block on PyTorch's inputs (local errors and the "
                        "LoRA's effect), no chained run: a quick check of one base")
    for dt in ("f32", "f16", "bf16"):
        low = "" if dt == "f32" else " (replaces the per-layer budget against the fp32 reference)"
        m.add_argument(f"--tol-{dt}", type=float, metavar="REL",
                       help=f"bound on max|a-b|/max|ref| per layer for --dtype {dt.replace('f', 'fp', 1) if dt != 'bf16' else dt}{low}")
        m.add_argument(f"--mismatch-{dt}", type=float, metavar="FRACTION",
                       help=f"bound on the fraction of mismatched elements per layer for that dtype{low}")
        m.add_argument(f"--rms-{dt}", type=float, metavar="REL",
                       help=f"bound on ||a-b||/||ref|| per layer for that dtype (the local rows have one){low}")
    m.set_defaults(func=_cmd_compare)

    cap = sub.add_parser("capture", help="run one backend and write a capture bundle (judged by compare --ms-bundle/"
                                         "--pt-bundle, on any machine)",
                         description="Activations, images, exact inputs, versions, timings and peak memory of one "
                                     "backend, as safetensors + JSON.")
    cap.add_argument("--backend", required=True, choices=("port", "mindone", "diffusers"))
    cap.add_argument("--replay-from", metavar="PT_BUNDLE",
                     help="port/mindone: also replay every block on this diffusers fp32 bundle's outputs (local "
                          "errors, the LoRA's effect); its inputs (prompt, latents, timesteps, size) are used")
    cap.add_argument("--replay-only", action="store_true", help="with --replay-from: no chained run")
    _add_base_args(cap)
    cap.add_argument("--pt-base", help="instead of --base: a diffusers SDXL pipeline folder ...")
    cap.add_argument("--ms-base", help="... and for --backend port the same weights as a MindSpore .ckpt")
    cap.add_argument("--lora", help="the LoRA: a MindONE .ckpt (converted for diffusers/mindone) or a PEFT file")
    _add_ema_args(cap)
    cap.add_argument("--pt-format", choices=("peft", "kohya"), default="peft",
                     help="--backend diffusers: convert a .ckpt to this format (default peft)")
    cap.add_argument("--latents", help=".npy latents (default: built-in seed 0)")
    cap.add_argument("--prompt", help="prompt text (default: the built-in prompt)")
    cap.add_argument("--alpha", type=float, help="LoRA alpha (default: rank)")
    cap.add_argument("--lora-scale", type=float,
                     help="a MindONE SD 1.x / 2.x LoRA .ckpt (lora_down / lora_up): the --lora_scale it runs with "
                          "(default 1)")
    cap.add_argument("--timestep", type=float, default=500.0, help="UNet timestep (default 500)")
    cap.add_argument("--timesteps", help="several UNet timesteps, e.g. 999,500,1")
    cap.add_argument("--steps", type=int, help="also generate an image with N denoising steps")
    cap.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance for --steps (default 5; Flux 3.5, its pipeline's default)")
    cap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    cap.add_argument("--ms-device", default="CPU", choices=("CPU", "Ascend", "GPU"), help="MindSpore device")
    cap.add_argument("--pt-device", default="cpu", help="torch device for diffusers")
    cap.add_argument("--ms-merge", action="store_true", help="port: fold the LoRA into the weights")
    cap.add_argument("--ms-graph", action="store_true", help="port: graph mode for image generation")
    cap.add_argument("--ms-python", metavar="PATH", help="interpreter for a MindSpore backend")
    _add_numerics_arg(cap)
    cap.add_argument("--quiet", action="store_true", help="no progress bars")
    cap.add_argument("-o", "--output", required=True, help="bundle folder to write")
    cap.add_argument("--force", action="store_true", help="replace an existing bundle")
    cap.set_defaults(func=_cmd_capture)

    i = sub.add_parser("infer", help="text-to-image with one backend (Euler, CFG), written as a PNG",
                       description="Generate an image from given initial noise with MindSpore (ms) or diffusers (pt).")
    i.add_argument("--backend", required=True, choices=("ms", "pt", "mindone"),
                   help="ms: this project's MindSpore port; pt: diffusers; mindone: mindone.diffusers (.venv-mindone)")
    _add_base_args(i)
    i.add_argument("--pt-base", help="instead of --base: a diffusers SDXL pipeline folder (configs, tokenizers; pt weights)")
    i.add_argument("--ms-base", help="MindSpore base .ckpt (SGM names); required for --backend ms")
    i.add_argument("--ms-lora", help="MindONE LoRA .ckpt (for pt: converted on the fly)")
    i.add_argument("--pt-lora", help="PyTorch LoRA .safetensors (--backend pt)")
    i.add_argument("--prompt", help="prompt text (default: the built-in prompt)")
    i.add_argument("--latents", help=".npy initial noise (N, 4, h, w) (default: built-in seed 0)")
    i.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    i.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    i.add_argument("-o", "--output", required=True, help="output PNG")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.add_argument("--ms-graph", action="store_true", help="MindSpore graph mode (compiled once; same results)")
    i.add_argument("--force", action="store_true", help="overwrite an existing output")
    i.set_defaults(func=_cmd_infer)

    d = sub.add_parser("demo", help="the main job on the built-in tiny SDXL (no downloads)",
                       description="Generate a MindONE-style LoRA, convert it, and print the report.")
    d.add_argument("--workdir", help="keep the demo files here (default: a temporary folder)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoraParityError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
