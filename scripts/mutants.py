#!/usr/bin/env python
"""Mutation score of ``compare``: plant realistic bugs one at a time and count how many a gate catches.

Every fault is a bug that could plausibly be written in one place: the converter
(``formats.py`` / ``converter.py``), the key map (``keymap.py``), the MindSpore port's weight
loading (``backends/port/capture.py``, ``backends/port/lora.py``, the base-weight map read through
``bases/sources.py``), the port's numerics, its sampler (``backends/port/sampler.py``,
``sampling.py``), the ``mindone`` backend (mindone.diffusers' loading, LoRA loader and Euler
scheduler, our CPU compatibility layer ``backends/mindone/compat.py``) and the judge's alignment
(``parity/align.py``).  Each is planted, ``compare`` runs on the built-in tiny SDXL
(``random:tiny``, LoRA on every LoRA-able module incl. convolutions and both text encoders, rank 4,
alpha 8 = scale 2) with the backend the fault lives in, and the verdict is

* **caught**: the report fails a gate (a layer out of tolerance, a missing activation, or the image
  when the fault lives in the sampler); the table says whether the first failing layer is the
  expected one (the block that holds the fault; diffusers names for ``mindone``);
* **missed**: every gate passes;
* **crash**: compare raises or a side child exits with an error.  The fault stopped the run and no
  gate judged it: a crash is not a detection.

Where each fault is planted:

* Converter / key-map faults live in the process that converts (compare's parent): monkeypatched
  here.  Both sides run again: the fault changes the PyTorch side, and the MindSpore side replays
  every block on the PyTorch side's outputs.  They run on ``port`` only: ``mindone`` loads the very
  PEFT file the converter wrote, so both sides would share the bug.
* Alignment faults live in the process that judges (the parent as well); the PyTorch side's clean
  capture is reused, the MindSpore side runs again (the alignment also says which PyTorch output each
  block is replayed on).  ``port`` only: the ``mindone`` backend is aligned name to name (diffusers
  names on both sides), there is no pairing to get wrong.
* MindSpore-side faults are planted in the side child through ``tests/child_faults``
  (``PYTHONPATH`` + ``LORA_PARITY_TEST_FAULT``; for ``mindone`` that child is ``.venv-mindone``'s
  Python); the PyTorch side's clean capture is reused.

One clean run per backend (layers + a 2-step image) is made first and must pass, or nothing is scored.
Exit status: 0 when every fault is caught, 1 when one is missed or crashes, 2 when nothing could be scored.

    .venv/bin/python scripts/mutants.py                 # everything (make mutants)
    .venv/bin/python scripts/mutants.py --backend mindone
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

PORT, MINDONE = "port", "mindone"
CAUGHT, MISSED, CRASH = "caught", "missed", "crash"

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
    expect: str  # the layer that should fail first (SGM name for port, diffusers name for mindone), or "image"
    child: str | None = None  # a fault of tests/child_faults/ (MindSpore side child)
    plant: Callable | None = None  # plant(monkeypatch, layout), in this (converting / judging) process
    steps: bool = False  # needs the image (the fault lives in the sampler)
    kohya: bool = False  # compare's conversion writes kohya for this one
    backend: str = PORT  # the MindSpore backend compare runs with
    judge: bool = False  # planted in the judge (the alignment): the PyTorch side's clean capture is reused

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
    # ---------------------------------------------------------------- the judge's alignment (parent)
    _m("align_unet_points_swapped", "lora_parity/parity/align.py",
       "output_blocks.2 / output_blocks.3 paired with each other's diffusers module (same shape)",
       UNET + "output_blocks.2", judge=True,
       plant=lambda mp, lay: faults.plant_unet_alignment_swap(mp, UNET + "output_blocks.2", UNET + "output_blocks.3")),
    _m("align_text_layer_off_by_one", "lora_parity/parity/align.py",
       "OpenCLIP resblocks.i paired with hidden_states.i (the layer's input), not i + 1", TE2 + "transformer.resblocks.0",
       judge=True, plant=lambda mp, lay: faults.plant_text_alignment_off_by_one(mp, "text_encoder_2")),
    # ---------------------------------------------------------------- mindone backend (child, .venv-mindone)
    _m("mindone_compat_gelu_tanh", "lora_parity/backends/mindone/compat.py",
       "CPU GELU computes the tanh approximation for approximate='none'", "text_encoder_2.hidden_states.1",
       child="mindone_compat_gelu_tanh", backend=MINDONE),
    _m("mindone_compat_layernorm_eps", "lora_parity/backends/mindone/compat.py",
       "CPU mint.nn.LayerNorm uses eps 1e-6, not the layer's 1e-5 (UNet transformer blocks)",
       "unet.down_blocks.1.attentions.0", child="mindone_compat_layernorm_eps", backend=MINDONE),
    _m("mindone_lora_scale_off", "mindone/diffusers/loaders/lora_pipeline.py",
       "PEFT scaling x1.003 after load_lora_weights (UNet and both text encoders)", "text_encoder.hidden_states.1",
       child="mindone_lora_scale_off", backend=MINDONE),
    _m("mindone_unet_attn1_qk_swapped", "mindone/diffusers/models/modeling_utils.py",
       "to_q/to_k weights exchanged on load (down_blocks.1.attentions.0, block 0 attn1)",
       "unet.down_blocks.1.attentions.0", child="mindone_unet_attn1_qk_swapped", backend=MINDONE),
    _m("mindone_te2_layer_qk_swapped", "mindone/transformers/modeling_utils.py",
       "text_encoder_2 layer 1 q_proj/k_proj exchanged on load", "text_encoder_2.hidden_states.2",
       child="mindone_te2_layer_qk_swapped", backend=MINDONE),
    _m("mindone_resnet_groupnorm_eps", "mindone/diffusers/models/resnet.py",
       "down_blocks.0.resnets.0 GroupNorm eps 1e-6 instead of 1e-5", "unet.down_blocks.0.resnets.0",
       child="mindone_resnet_groupnorm_eps", backend=MINDONE),
    _m("mindone_euler_steps_offset_dropped", "mindone/diffusers/schedulers/scheduling_euler_discrete.py",
       "set_timesteps ignores steps_offset (timesteps 500, 0 instead of 501, 1)", IMAGE,
       child="mindone_euler_steps_offset_dropped", steps=True, backend=MINDONE),
]


class CleanRunFailed(RuntimeError):
    """The clean comparison of a backend does not pass: no fault on it can be scored."""


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # caught | missed | crash
    first: str | None  # the first failing layer (or "image", "missing NAME", the run's own failure)
    detail: str
    seconds: float

    @property
    def caught(self) -> bool:
        return self.verdict == CAUGHT

    @property
    def as_expected(self) -> bool:
        """Caught, and first failing where the fault lives."""
        return self.caught and self.first == self.mutant.expect


class Runner:
    """One base, one LoRA, one clean run per backend whose captures every fault reuses.

    A backend's clean run is made before its first fault (:meth:`prepare`); the PyTorch side's clean
    capture is made once and shared by both backends.  A MindSpore-side or alignment fault reruns the
    MindSpore side only; a converter fault reruns both (the MindSpore side replays its blocks on the
    PyTorch side's outputs, which the fault changes)."""

    def __init__(self, work: Path, cache: Path | None = None, quiet: bool = True):
        self.work = Path(work)
        self.cache = Path(cache) if cache else self.work / "cache"
        self.quiet = quiet
        self.lora = self.work / "lora.ckpt"
        self.captures: dict[str, Path] = {}  # "pt" and each prepared backend -> a kept capture folder
        self.kohya_checked = False
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

    def _base_and_lora(self) -> None:
        from lora_parity.bases import resolve_base
        from lora_parity.convert.layout import layout_from_pipeline_dir
        from lora_parity.fixtures.synthetic import make_lora, write_ms_lora

        if self.layout is not None:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        b = resolve_base(BASE, cache=self.cache)
        self.layout = layout_from_pipeline_dir(b.pipeline_dir)
        write_ms_lora(self.lora, make_lora(self.layout, rank=RANK, alpha=ALPHA, modules="all", seed=5, b_std=0.1))

    def prepare(self, backend: str = PORT) -> float:
        """Generate the base and LoRA (once), run ``backend``'s clean comparison (must pass) and keep its
        captures; the seconds taken (0 when already prepared)."""
        if backend in self.captures:
            return 0.0
        t0 = time.perf_counter()
        self._base_and_lora()
        keep = self.work / ("clean" if backend == PORT else f"clean-{backend}")
        reuse = {"pt": self.captures["pt"]} if "pt" in self.captures else {}
        report = self._run(ms_backend=backend, steps=STEPS, keep_captures=keep, reuse_captures=reuse)
        if not report.passed:
            raise CleanRunFailed(f"the clean comparison on --ms-backend {backend} fails; no fault on it can be "
                                 f"scored:\n" + report.table())
        self.captures.setdefault("pt", keep / "pt")
        self.captures[backend] = keep / "ms"
        return time.perf_counter() - t0

    def _kohya_control(self) -> None:
        """The kohya path on its own must pass before a kohya fault is scored."""
        if self.kohya_checked:
            return
        report = self._run(pt_format="kohya")
        if not report.passed:
            raise CleanRunFailed("compare with a kohya conversion fails without a fault:\n" + report.table())
        self.kohya_checked = True

    def _faulty_report(self, m: Mutant):
        """compare with ``m`` planted, reusing the clean captures of the sides the fault cannot change."""
        import pytest

        kw = {"ms_backend": m.backend, **({"steps": STEPS} if m.steps else {})}
        if m.child:
            with _child_fault(m.child):
                return self._run(reuse_captures={"pt": self.captures["pt"]}, **kw)
        reuse = {"pt": self.captures["pt"]} if m.judge else {}
        if m.kohya:
            self._kohya_control()
            kw["pt_format"] = "kohya"
        with pytest.MonkeyPatch.context() as mp:
            m.plant(mp, self.layout)
            return self._run(reuse_captures=reuse, **kw)

    def run(self, m: Mutant) -> Outcome:
        """Plant ``m``, run compare, and give the verdict (a clean run that fails raises CleanRunFailed)."""
        self.prepare(m.backend)
        t0 = time.perf_counter()
        try:
            report = self._faulty_report(m)
        except CleanRunFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any stop of compare is a crash, whatever raised it
            msg = (str(exc).strip().splitlines() or [""])[0]
            return Outcome(m, CRASH, None, f"compare stopped: {type(exc).__name__}: {msg}", time.perf_counter() - t0)
        return outcome_of(m, report, time.perf_counter() - t0)


def outcome_of(m: Mutant, report, seconds: float) -> Outcome:
    """The verdict on a completed report: caught by which gate, or missed."""
    img = report.image
    img_note = _image_note(img) if img else ""
    if report.passed:
        worst = max(report.layers, key=lambda x: x.rel_err / x.tol_rel if x.tol_rel else x.rel_err)
        kind = f"{worst.kind}: " if getattr(worst, "kind", None) else ""
        detail = f"every gate passes; closest {worst.sgm} ({kind}{_stats(worst)})"
        return Outcome(m, MISSED, None, detail + (f"; {img_note}" if img else ""), seconds)
    first = report.first_failure
    if first is not None:
        kind = f"{first.kind}: " if getattr(first, "kind", None) else ""
        detail = f"first failing layer {first.sgm} ({kind}{_stats(first)})"
        return Outcome(m, CAUGHT, first.sgm, detail + (f"; {img_note}" if img else ""), seconds)
    if img is not None and not img["passed"]:
        return Outcome(m, CAUGHT, IMAGE, img_note + " (every layer within tolerance)", seconds)
    if report.missing:
        return Outcome(m, CAUGHT, f"missing {report.missing[0]}", f"missing activations: {report.missing[:2]}",
                       seconds)
    return Outcome(m, CAUGHT, report.failures[0], f"the run fails: {report.failures[0]}", seconds)


def _image_note(img: dict) -> str:
    if img.get("mae") is None:  # no image to measure (a side generated none)
        return str(img.get("title") or "image not compared")
    return f"image MAE {img['mae']:.3f} (threshold {img['mae_threshold']:g}), PSNR {img['psnr']:.1f} dB"


def _stats(m) -> str:
    """A layer's two statistics against their bounds (and which checks failed, when any did)."""
    out = f"rel {m.rel_err:.2e} / {m.tol_rel:.0e}"
    if getattr(m, "mismatch_budget", None) is not None and hasattr(m, "mismatch_fraction"):
        out += f", mismatch {m.mismatch_fraction:.1%} / {m.mismatch_budget:.1%}"
    failed = getattr(m, "failed", ())
    return out + (f", failed: {'+'.join(failed)}" if failed else "")


@contextlib.contextmanager
def _child_fault(name: str):
    """Plant ``name`` in the MindSpore side child (tests/child_faults/sitecustomize.py) for the block.

    The side child inherits this environment whichever interpreter runs it (``.venv`` for the port,
    ``.venv-mindone`` for mindone): ``run_side`` only puts its own folder in front of ``PYTHONPATH``."""
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


def select(names: list[str] | None = None, backend: str = "all") -> list[Mutant]:
    """The catalogue's faults on ``backend`` (port, mindone or all), by name (all when None)."""
    if names:
        unknown = sorted(set(names) - {m.name for m in CATALOGUE})
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(unknown)}")
    return [m for m in CATALOGUE if backend in ("all", m.backend) and (not names or m.name in names)]


def format_line(i: int, n: int, o: Outcome) -> str:
    status = {CAUGHT: "caught", MISSED: "MISSED", CRASH: "CRASH"}[o.verdict]
    if o.caught and not o.as_expected:
        status += "*"  # caught, but not where the fault lives
    return f"[{i:>2}/{n}] {status:<7} {o.mutant.name:<36} {o.mutant.backend:<8} {o.detail}  ({o.seconds:.0f} s)"


def summary_table(outcomes: list[Outcome]) -> str:
    """One row per fault: mutant, backend, where, verdict, first failing layer, expected layer, seconds."""
    rows = [("mutant", "backend", "where", "verdict", "first failing", "expected", "s")]
    for o in outcomes:
        mark = " *" if o.caught and not o.as_expected else ""
        rows.append((o.mutant.name, o.mutant.backend, o.mutant.where, o.verdict + mark, o.first or "-",
                     "=" if o.as_expected else o.mutant.expect, f"{o.seconds:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i == len(r) - 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def score_line(outcomes: list[Outcome]) -> str:
    count = {v: sum(o.verdict == v for o in outcomes) for v in (CAUGHT, MISSED, CRASH)}
    off = sum(o.caught and not o.as_expected for o in outcomes)
    return (f"mutation score: {count[CAUGHT]}/{len(outcomes)} caught ({off} not at the expected layer), "
            f"{count[MISSED]} missed, {count[CRASH]} crashed")


def exit_status(outcomes: list[Outcome]) -> int:
    """1 when a fault is missed or crashes compare (no gate detected it), else 0."""
    return 1 if any(o.verdict in (MISSED, CRASH) for o in outcomes) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated fault names")
    ap.add_argument("--backend", choices=("port", "mindone", "all"), default="all",
                    help="faults of this MindSpore backend only (default: all)")
    ap.add_argument("--list", action="store_true", help="list the catalogue and exit")
    ap.add_argument("--workdir", help="keep the base, LoRA and captures here (default: a temporary folder)")
    ap.add_argument("--cache", help="cache for the generated base (default: WORKDIR/cache)")
    ap.add_argument("--verbose", action="store_true", help="show compare's own output")
    args = ap.parse_args(argv)
    try:
        chosen = select([s.strip() for s in args.only.split(",") if s.strip()] if args.only else None, args.backend)
    except ValueError as exc:
        ap.error(str(exc))
    if args.list:
        for m in chosen:
            print(f"{m.name:<36} {m.backend:<8} {m.side:<6} {m.where:<58} expect {m.expect}: {m.what}")
        print(f"{len(chosen)} faults")
        return 0
    if not chosen:
        print("no fault selected (--only and --backend exclude each other)")
        return 2
    from lora_parity.backends import get_backend

    for backend in sorted({m.backend for m in chosen}):
        ok, why = get_backend(backend).is_available()
        if not ok:
            print(f"--ms-backend {backend} cannot run: {why} (run make setup, or choose --backend)")
            return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    t0 = time.perf_counter()
    outcomes: list[Outcome] = []
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="lora-parity-mutants-")))
        runner = Runner(work, args.cache, quiet=not args.verbose)
        try:
            for i, m in enumerate(chosen, 1):
                if m.backend not in runner.captures:
                    print(f"clean run on {BASE}, --ms-backend {m.backend} (LoRA rank {RANK}, alpha {ALPHA:g}, "
                          f"{STEPS}-step image) ...", flush=True)
                    print(f"clean run passed ({runner.prepare(m.backend):.0f} s)", flush=True)
                outcomes.append(runner.run(m))
                print(format_line(i, len(chosen), outcomes[-1]), flush=True)
        except CleanRunFailed as exc:
            print(exc)
            return 2
    print()
    print(summary_table(outcomes))
    print(f"\n{score_line(outcomes)} ({time.perf_counter() - t0:.0f} s)")
    off = [o for o in outcomes if o.caught and not o.as_expected]
    if off:
        print("* caught, but not at the expected layer: " + ", ".join(f"{o.mutant.name} (expected {o.mutant.expect})"
                                                                    for o in off))
    for verdict in (MISSED, CRASH):
        names = [o.mutant.name for o in outcomes if o.verdict == verdict]
        if names:
            print(f"{verdict}: " + ", ".join(names))
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
