#!/usr/bin/env python
"""Mutation score of ``compare``: plant realistic bugs one at a time and count how many it catches.

Every fault is a bug that could plausibly be written in one place of the tool: the converter
(``formats.py`` / ``convert.py``), the key map (``keymap.py``), the MindSpore port's weight
loading (``backends/port/capture.py``, ``backends/port/lora.py``, the base-weight map read through
``bases/sources.py``), the port's numerics, or its sampler (``backends/port/sampler.py``,
``sampling.py``).  Each is planted, ``compare`` runs on the built-in tiny SDXL (``random:tiny``,
LoRA on every LoRA-able module incl. convolutions and both text encoders, rank 4, alpha 8 =
scale 2), and the fault is *caught* when the report fails (a layer out of tolerance, or the
image when the fault lives in the sampler) or when compare stops with an error.

* Converter / key-map faults live in the process that converts (compare's parent): they are
  monkeypatched here, and the MindSpore side's capture from a clean run is reused.
* MindSpore-side faults are planted in the MindSpore child through ``tests/child_faults``
  (``PYTHONPATH`` + ``LORA_PARITY_TEST_FAULT``); the PyTorch side's clean capture is reused.

One clean run (layers + a 2-step image) is made first and must pass, or nothing is scored.

    .venv/bin/python scripts/mutants.py                 # everything (make mutants)
    .venv/bin/python scripts/mutants.py --list
    .venv/bin/python scripts/mutants.py --only cfg_wrong_branch,keymap_attn1_qk_swap
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import faults  # noqa: E402  (the same plants the fault tests use)

CHILD_FAULTS = ROOT / "tests" / "child_faults"
BASE = "random:tiny"
RANK, ALPHA = 4, 8.0  # scale 2: a lost or inverted alpha shows
STEPS = 2

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."
VAE = "first_stage_model."
IMAGE = "image"

_CONV_KEY = re.compile(r"\.(conv_in|conv1|conv2|conv_shortcut|conv|conv_out)\.lora_[AB]\.weight$")


@dataclass(frozen=True)
class Mutant:
    name: str
    where: str  # the file the bug would be written in
    what: str
    expect: str  # the SGM layer that should fail first, or "image"
    child: str | None = None  # a fault of tests/child_faults/child_fault_patches.py (MindSpore side)
    plant: Callable | None = None  # plant(monkeypatch, layout), in this (converting) process
    steps: bool = False  # needs the image (the fault lives in the sampler)
    kohya: bool = False  # compare's conversion writes kohya for this one

    @property
    def side(self) -> str:
        return "ms" if self.child else "parent"


def _m(name, where, what, expect, **kw) -> Mutant:
    return Mutant(name, where, what, expect, **kw)


CATALOGUE: list[Mutant] = [
    # ---------------------------------------------------------------- key map (parent)
    _m("keymap_attn1_qk_swap", "lora_parity/convert/keymap.py", "attn1 to_q/to_k entries point at each other (input_blocks.3)",
       UNET + "input_blocks.3",
       plant=lambda mp, lay: faults.plant_keymap_swap(
           mp, lay, UNET + "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
           UNET + "input_blocks.3.1.transformer_blocks.0.attn1.to_k")),
    _m("keymap_up_attention_off_by_one", "lora_parity/convert/keymap.py",
       "output_blocks.0.1 <-> output_blocks.1.1 (up_blocks.0.attentions index off by one)", UNET + "output_blocks.0",
       plant=lambda mp, lay: faults.plant_keymap_block_swap(mp, lay, UNET + "output_blocks.0.1.",
                                                            UNET + "output_blocks.1.1.")),
    _m("keymap_in_proj_kqv", "lora_parity/convert/keymap.py", "fused OpenCLIP in_proj listed as k, q, v (lora_B rows split wrong)",
       TE2 + "transformer.resblocks.0", plant=lambda mp, lay: faults.plant_fused_keymap_order(mp, lay)),
    # ---------------------------------------------------------------- converter (parent)
    _m("peft_unet_alpha_lost", "lora_parity/convert/formats.py", "adapter metadata: unet.lora_alpha = r (alpha lost)",
       UNET + "time_embed",
       plant=lambda mp, lay: faults.plant_peft_alpha(mp, lambda r, a: r, ["unet"])),
    _m("peft_alpha_inverted", "lora_parity/convert/formats.py", "adapter metadata: lora_alpha = r*r/alpha (scale r/alpha)",
       TE1 + "encoder.layers.0",
       plant=lambda mp, lay: faults.plant_peft_alpha(mp, lambda r, a: r * r / a)),
    _m("convert_alpha_not_forwarded", "lora_parity/convert/converter.py", "--alpha not passed to the reader (alpha = r)",
       TE1 + "encoder.layers.0", plant=lambda mp, lay: faults.plant_alpha_not_forwarded(mp)),
    _m("writer_drops_text_encoder_2", "lora_parity/convert/formats.py", "text_encoder_2 keys left out of the PEFT file",
       TE2 + "transformer.resblocks.0",
       plant=lambda mp, lay: faults.plant_writer_drop(mp, lambda k: k.startswith("text_encoder_2."))),
    _m("writer_drops_te1_layer", "lora_parity/convert/formats.py", "CLIP-L layer 1's LoRA left out",
       TE1 + "encoder.layers.1",
       plant=lambda mp, lay: faults.plant_writer_drop(
           mp, lambda k: k.startswith("text_encoder.text_model.encoder.layers.1."))),
    _m("writer_drops_conv_lora", "lora_parity/convert/formats.py", "only Linear LoRAs written (LoCon dropped)",
       UNET + "input_blocks.0", plant=lambda mp, lay: faults.plant_writer_drop(mp, lambda k: bool(_CONV_KEY.search(k)))),
    _m("writer_transposed_update", "lora_parity/convert/formats.py",
       "square module stores (BA)^T: lora_A := B^T, lora_B := A^T (middle_block attn1.to_out.0)", UNET + "middle_block",
       plant=lambda mp, lay: faults.plant_transposed_update(
           mp, UNET + "middle_block.1.transformer_blocks.0.attn1.to_out.0")),
    _m("writer_lora_a_reshaped", "lora_parity/convert/formats.py", "UNet Linear lora_A written as A.T.reshape(A.shape)",
       UNET + "time_embed", plant=lambda mp, lay: faults.plant_lora_a_layout_mixup(mp, "unet")),
    _m("kohya_name_swap", "lora_parity/convert/formats.py", "kohya writer swaps attn2 to_k/to_v names (output_blocks.1)",
       UNET + "output_blocks.1", kohya=True,
       plant=lambda mp, lay: faults.plant_kohya_name_swap(
           mp, lay, UNET + "output_blocks.1.1.transformer_blocks.1.attn2.to_k",
           UNET + "output_blocks.1.1.transformer_blocks.1.attn2.to_v")),
    # ---------------------------------------------------------------- MindSpore weight loading (child)
    _m("lora_unet_only", "lora_parity/backends/port/capture.py", "_Loader.fill injects LoRA into the UNet only",
       TE1 + "encoder.layers.0", child="lora_unet_only"),
    _m("te2_layer_lora_dropped", "lora_parity/backends/port/capture.py", "OpenCLIP resblocks.1 LoRA lost on reading",
       TE2 + "transformer.resblocks.1", child="te2_layer_lora_dropped"),
    _m("lora_b_transposed", "lora_parity/backends/port/capture.py", "lora_B read as B.T.reshape(B.shape)",
       TE1 + "encoder.layers.0", child="lora_b_transposed"),
    _m("up_attention_index_off_by_one", "lora_parity/bases/sources.py",
       "base weights of output_blocks.0.1 <-> output_blocks.1.1 (param map index off by one)", UNET + "output_blocks.0",
       child="up_attention_index_off_by_one"),
    _m("text_projection_not_transposed", "lora_parity/bases/sources.py", "text_projection map rule copy, not transpose",
       TE2 + "text_projection", child="text_projection_not_transposed"),
    _m("in_proj_concat_kqv", "lora_parity/bases/sources.py", "fused in_proj weight concatenated k, q, v",
       TE2 + "transformer.resblocks.0", child="in_proj_concat_kqv"),
    # ---------------------------------------------------------------- LoRA injection (child)
    _m("lora_scale_ignored", "lora_parity/backends/port/lora.py", "scale 1 (alpha ignored)",
       TE1 + "encoder.layers.0", child="lora_scale_ignored"),
    _m("lora_scale_inverted", "lora_parity/backends/port/lora.py", "scale r/alpha",
       TE1 + "encoder.layers.0", child="lora_scale_inverted"),
    _m("in_proj_lora_rows_kqv", "lora_parity/backends/port/text.py", "fused in_proj LoRA output added as k, q, v",
       TE2 + "transformer.resblocks.0", child="in_proj_lora_rows_kqv"),
    # ---------------------------------------------------------------- port numerics (child)
    _m("qkv_split_wrong_order", "lora_parity/backends/port/text.py", "OpenCLIP in_proj output split k, q, v",
       TE2 + "transformer.resblocks.0", child="qkv_split_wrong_order"),
    _m("last_hidden_state_as_context", "lora_parity/backends/port/text.py",
       "context from the last layer, not the penultimate", "conditioner.context", child="last_hidden_state_as_context"),
    _m("crop_and_original_size_swapped", "lora_parity/backends/port/unet.py", "y built from (crop, orig, target)",
       "conditioner.vector", child="crop_and_original_size_swapped"),
    _m("timestep_sin_cos_swapped", "lora_parity/backends/port/unet.py", "sinusoids [sin, cos] not [cos, sin]",
       "conditioner.vector", child="timestep_sin_cos_swapped"),
    _m("groupnorm_eps", "lora_parity/backends/port/unet.py", "ResBlock GroupNorm eps 1e-6 instead of 1e-5",
       UNET + "input_blocks.1", child="groupnorm_eps"),
    _m("self_attention_qk_swapped", "lora_parity/backends/port/unet.py", "self-attention as attention(k, q, v)",
       UNET + "input_blocks.3", child="self_attention_qk_swapped"),
    _m("vae_scaling_factor_missing", "lora_parity/backends/port/vae.py", "latents not divided by scaling_factor",
       VAE + "post_quant_conv", child="vae_scaling_factor_missing"),
    # ---------------------------------------------------------------- sampler (child, image)
    _m("cfg_wrong_branch", "lora_parity/backends/port/sampler.py", "guidance c + g (u - c)", IMAGE,
       child="cfg_wrong_branch", steps=True),
    _m("unconditional_not_zeroed", "lora_parity/backends/port/sampler.py",
       "force_zeros_for_empty_prompt ignored (uncond = cond)", IMAGE, child="unconditional_not_zeroed", steps=True),
    _m("input_scale_sigma_off_by_one", "lora_parity/backends/port/sampler.py",
       "scale_model_input with sigma[i + 1]", IMAGE, child="input_scale_sigma_off_by_one", steps=True),
    _m("init_noise_sigma_missing", "lora_parity/backends/port/sampler.py", "start noise not scaled by init sigma",
       IMAGE, child="init_noise_sigma_missing", steps=True),
    _m("euler_dt_sign", "lora_parity/sampling.py", "Euler step length sigma_i - sigma_{i+1}", IMAGE,
       child="euler_dt_sign", steps=True),
    _m("timesteps_off_by_one", "lora_parity/sampling.py", "steps_offset dropped (timesteps 500, 0 instead of 501, 1)", IMAGE,
       child="timesteps_off_by_one", steps=True),
]


@dataclass
class Outcome:
    mutant: Mutant
    caught: bool
    how: str  # "layer" | "image" | "error"
    detail: str
    seconds: float
    as_expected: bool


class Runner:
    """One base, one LoRA, one clean run whose captures every fault reuses."""

    def __init__(self, work: Path, cache: Path | None = None, quiet: bool = True):
        self.work = Path(work)
        self.cache = Path(cache) if cache else self.work / "cache"
        self.quiet = quiet
        self.lora = self.work / "lora.ckpt"
        self.clean = self.work / "clean"
        self.kohya_clean: Path | None = None
        self.layout = None

    def _opts(self, **kw):
        from lora_parity.compare import CompareOptions

        return CompareOptions(base=BASE, cache=self.cache, ms_lora=self.lora, alpha=ALPHA, **kw)

    def _run(self, **kw):
        from lora_parity.compare import run_compare

        if not self.quiet:
            return run_compare(self._opts(**kw))
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            return run_compare(self._opts(**kw))

    def prepare(self) -> float:
        """Generate the base and LoRA, run the clean comparison (must pass) and keep its captures."""
        from lora_parity.bases import resolve_base
        from lora_parity.convert.layout import layout_from_pipeline_dir
        from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

        t0 = time.perf_counter()
        self.work.mkdir(parents=True, exist_ok=True)
        b = resolve_base(BASE, cache=self.cache)
        self.layout = layout_from_pipeline_dir(b.pipeline_dir)
        write_ms_lora(self.lora, make_lora(self.layout, rank=RANK, alpha=ALPHA, modules="all", seed=5, b_std=0.1))
        report = self._run(steps=STEPS, keep_captures=self.clean)
        if not report.passed:
            raise SystemExit("the clean comparison fails; no fault can be scored:\n" + report.table())
        return time.perf_counter() - t0

    def _kohya_control(self) -> None:
        """The kohya path on its own must pass before a kohya fault is scored."""
        import pytest

        if self.kohya_clean is not None:
            return
        report = self._run(reuse_captures={"ms": self.clean / "ms"}, pt_format="kohya")
        if not report.passed:
            raise RuntimeError("compare with a kohya conversion fails without a fault: " + report.first_failure.message())
        self.kohya_clean = self.clean

    def run(self, m: Mutant) -> Outcome:
        import pytest

        from lora_parity.errors import LoraParityError

        t0 = time.perf_counter()
        kw = {"steps": STEPS} if m.steps else {}
        try:
            if m.child:
                with _child_fault(m.child):
                    report = self._run(reuse_captures={"pt": self.clean / "pt"}, **kw)
            else:
                if m.kohya:
                    self._kohya_control()
                with pytest.MonkeyPatch.context() as mp:
                    m.plant(mp, self.layout)
                    report = self._run(reuse_captures={"ms": self.clean / "ms"},
                                       **({"pt_format": "kohya"} if m.kohya else {}), **kw)
        except LoraParityError as exc:
            msg = str(exc).splitlines()[0]
            return Outcome(m, True, "error", f"compare stopped: {msg}", time.perf_counter() - t0, False)
        seconds = time.perf_counter() - t0
        first = report.first_failure
        img = report.image
        img_note = f"image MAE {img['mae']:.3f} (threshold {img['mae_threshold']:g}), PSNR {img['psnr']:.1f} dB" if img else ""
        if first is not None:
            detail = f"first failing layer {first.sgm} ({_stats(first)})"
            return Outcome(m, True, "layer", detail + (f"; {img_note}" if img else ""), seconds, first.sgm == m.expect)
        if img is not None and not img["passed"]:
            return Outcome(m, True, "image", img_note + " (every layer within tolerance)", seconds, m.expect == IMAGE)
        if report.missing:
            return Outcome(m, True, "layer", f"missing activations: {report.missing[:2]}", seconds, False)
        worst = max(report.layers, key=lambda x: x.rel_err / x.tol_rel if x.tol_rel else x.rel_err)
        detail = f"every layer passes; closest {worst.sgm} ({_stats(worst)})"
        return Outcome(m, False, "-", detail + (f"; {img_note}" if img else ""), seconds, False)


def _stats(m) -> str:
    """A layer's two statistics against their bounds (and which checks failed, when any did)."""
    out = f"rel {m.rel_err:.2e} / {m.tol_rel:.0e}"
    if getattr(m, "mismatch_budget", None) is not None and hasattr(m, "mismatch_fraction"):
        out += f", mismatch {m.mismatch_fraction:.1%} / {m.mismatch_budget:.1%}"
    failed = getattr(m, "failed", ())
    return out + (f", failed: {'+'.join(failed)}" if failed else "")


@contextlib.contextmanager
def _child_fault(name: str):
    """Plant ``name`` in the MindSpore child (tests/child_faults/sitecustomize.py) for the block."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "LORA_PARITY_TEST_FAULT")}
    os.environ["PYTHONPATH"] = str(CHILD_FAULTS) + (os.pathsep + saved["PYTHONPATH"] if saved["PYTHONPATH"] else "")
    os.environ["LORA_PARITY_TEST_FAULT"] = name
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def format_line(i: int, n: int, o: Outcome) -> str:
    status = "caught" if o.caught else "MISSED"
    if o.caught and not o.as_expected:
        status += "*"  # caught, but not where the fault lives
    return (f"[{i:>2}/{n}] {status:<7} {o.mutant.name:<32} {o.mutant.where:<44} {o.detail}  ({o.seconds:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated fault names")
    ap.add_argument("--list", action="store_true", help="list the catalogue and exit")
    ap.add_argument("--workdir", help="keep the base, LoRA and captures here (default: a temporary folder)")
    ap.add_argument("--cache", help="cache for the generated base (default: WORKDIR/cache)")
    ap.add_argument("--verbose", action="store_true", help="show compare's own output")
    args = ap.parse_args(argv)
    if args.list:
        for m in CATALOGUE:
            print(f"{m.name:<32} {m.side:<6} {m.where:<44} expect {m.expect}: {m.what}")
        print(f"{len(CATALOGUE)} faults")
        return 0
    chosen = CATALOGUE
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(names) - {m.name for m in CATALOGUE})
        if unknown:
            ap.error(f"unknown fault(s): {', '.join(unknown)}")
        chosen = [m for m in CATALOGUE if m.name in names]
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="lora-parity-mutants-")))
        runner = Runner(work, args.cache, quiet=not args.verbose)
        print(f"clean run on {BASE} (LoRA rank {RANK}, alpha {ALPHA:g}, {STEPS}-step image) ...", flush=True)
        print(f"clean run passed ({runner.prepare():.0f} s); {len(chosen)} faults", flush=True)
        outcomes = []
        for i, m in enumerate(chosen, 1):
            o = runner.run(m)
            outcomes.append(o)
            print(format_line(i, len(chosen), o), flush=True)
    caught = sum(o.caught for o in outcomes)
    off = [o for o in outcomes if o.caught and not o.as_expected]
    print(f"\nmutation score: {caught}/{len(outcomes)} caught ({time.perf_counter() - t0:.0f} s)")
    if off:
        print("* caught, but not at the expected layer: " + ", ".join(f"{o.mutant.name} (expected {o.mutant.expect})"
                                                                    for o in off))
    missed = [o for o in outcomes if not o.caught]
    if missed:
        print("missed: " + ", ".join(o.mutant.name for o in missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
