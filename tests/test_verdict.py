"""The judge's three views of a layer -- chained, local (replayed), the LoRA's effect -- on synthetic captures:
which failure is named first, low-precision budgets that never go infinite, no-op LoRAs, the effect's bound."""
from __future__ import annotations

import numpy as np
import pytest

from lora_parity.compare import lora_blocks
from lora_parity.parity.align import alignment_for
from lora_parity.parity.tolerances import EFFECT_GATES, LOCAL_GATES, point_gate
from lora_parity.parity.verdict import LOCAL, NOLORA, Judge

from .synthetic_sides import write_configs

pytestmark = pytest.mark.parity

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return write_configs(tmp_path_factory.mktemp("verdict") / "configs")


@pytest.fixture(scope="module")
def alignment(configs):
    return alignment_for(configs, [500.0], "sgm")


def _captures(alignment, seed: int = 0):
    """A PyTorch capture (chained, replayed with and without the LoRA) and a MindSpore one equal to it."""
    rng = np.random.default_rng(seed)
    pt = {}
    for a in alignment:
        out = rng.standard_normal((2, 16)).astype(np.float32)
        effect = (0.1 * rng.standard_normal((2, 16))).astype(np.float32)
        pt[a.diffusers] = out
        pt[LOCAL + a.diffusers] = out
        pt[NOLORA + a.diffusers] = out - effect
    ms = {}
    for a in alignment:
        ms[a.sgm] = pt[a.diffusers].copy()
        ms[LOCAL + a.sgm] = pt[LOCAL + a.diffusers].copy()
        ms[NOLORA + a.sgm] = pt[NOLORA + a.diffusers].copy()
    return ms, pt


def _judge(dtype="F32"):
    return Judge(backend="port", dtype=dtype)


def _unet(alignment, block: str):
    return next(a for a in alignment if a.sgm == UNET + block)


def test_a_fault_is_named_by_the_first_local_failure_not_the_first_chained_one(alignment):
    ms, pt = _captures(alignment)
    order = [a for a in alignment if a.component == "unet"]
    upstream, faulty = order[3], order[6]
    # a fault in block 6 shows locally there; the chained run drifts from block 3 on (an upstream drift
    # within no local row's reach would still not be the block to look at)
    for a in order[3:]:
        ms[a.sgm] = ms[a.sgm] * np.float32(1.01)
    ms[LOCAL + faulty.sgm] = ms[LOCAL + faulty.sgm] * np.float32(1.01)
    report = _judge().judge(alignment, ms, pt)
    first = report.first_failure
    assert (first.sgm, first.kind) == (faulty.sgm, "local"), first.message()
    assert any(m.sgm == upstream.sgm and m.kind == "chained" and not m.passed for m in report.layers)


def test_local_rows_are_tight_and_sinusoid_points_keep_their_own_row(alignment):
    ms, pt = _captures(alignment)
    block = _unet(alignment, "input_blocks.1")
    ms[LOCAL + block.sgm] = pt[block.diffusers] * np.float32(1 + 3 * LOCAL_GATES[("port", "F32")].rel)
    sin = _unet(alignment, "time_embed")
    ms[LOCAL + sin.sgm] = pt[sin.diffusers] * np.float32(1 + 3 * LOCAL_GATES[("port", "F32")].rel)
    report = _judge().judge(alignment, ms, pt)
    local = {m.sgm: m for m in report.layers if m.kind == "local"}
    assert not local[block.sgm].passed and local[block.sgm].row == "local"
    assert local[sin.sgm].passed and local[sin.sgm].row == "sinusoid"
    assert point_gate("F32", "port", "local", "unet", sin.diffusers).rel > LOCAL_GATES[("port", "F32")].rel


def test_low_precision_budget_is_never_infinite(alignment):
    """PyTorch's own fp16 run going non-finite at a layer fails that layer, naming the side; it does not
    turn the budget into infinity (which would pass anything)."""
    ms, pt = _captures(alignment)
    low = {k: v.astype(np.float16).astype(np.float32) for k, v in pt.items()}
    block = _unet(alignment, "middle_block")
    low[block.diffusers] = np.full_like(low[block.diffusers], np.inf)
    low[LOCAL + block.diffusers] = np.full_like(low[block.diffusers], np.nan)
    ms = {k: v.astype(np.float16).astype(np.float32) for k, v in ms.items()}
    report = _judge("F16").judge(alignment, ms, pt, low)
    bad = [m for m in report.layers if m.sgm == block.sgm and m.kind in ("local", "chained")]
    assert len(bad) == 2 and all(not m.passed and "ref-finite" in m.failed for m in bad)
    assert all("PyTorch's own f16 run went non-finite" in m.message() for m in bad)
    assert all(np.isfinite(m.tol_rel) for m in report.layers)
    others = [m for m in report.layers if m.sgm != block.sgm]
    assert all(m.passed for m in others), [m.message() for m in others if not m.passed][:3]


def test_a_lora_that_does_nothing_on_one_side_fails_naming_the_side(alignment):
    ms, pt = _captures(alignment)
    block = _unet(alignment, "input_blocks.3")
    ms[NOLORA + block.sgm] = ms[LOCAL + block.sgm].copy()  # with and without the LoRA: the same
    report = _judge().judge(alignment, ms, pt, targets={block.sgm})
    effect = [m for m in report.layers if m.kind == "effect"]
    assert len(effect) == 1 and "noop" in effect[0].failed
    assert "MindSpore side" in effect[0].message() and "PyTorch" not in effect[0].message().split("side")[0]
    assert not report.passed


def test_the_effect_is_judged_against_its_own_size(alignment):
    ms, pt = _captures(alignment)
    block = _unet(alignment, "input_blocks.3")
    report = _judge().judge(alignment, ms, pt, targets={block.sgm})
    assert report.passed
    # the LoRA scaled by 1.003 on the MindSpore side: tiny against the output, 3e-3 of the effect
    effect = pt[LOCAL + block.diffusers].astype(np.float64) - pt[NOLORA + block.diffusers]
    ms[LOCAL + block.sgm] = (ms[NOLORA + block.sgm] + 1.003 * effect).astype(np.float32)
    report = _judge().judge(alignment, ms, pt, targets={block.sgm})
    m = next(m for m in report.layers if m.kind == "effect")
    assert not m.passed and m.rel_err > EFFECT_GATES["F32"].rel and m.effect_size == pytest.approx(
        np.abs(effect).max(), rel=1e-6)


def test_the_blocks_a_lora_file_targets(configs):
    modules = [UNET + "input_blocks.3.1.transformer_blocks.0.attn2.to_k", UNET + "output_blocks.1.2.conv",
               "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj", UNET + "time_embed.0"]
    sgm = lora_blocks({"lora_modules": modules}, {}, configs, "sgm")
    assert sgm == {UNET + "input_blocks.3", UNET + "output_blocks.1",
                   "conditioner.embedders.1.model.transformer.resblocks.1", UNET + "time_embed"}
    dif = lora_blocks({}, {"lora_modules": modules}, configs, "diffusers")
    assert dif == {"unet.down_blocks.1.attentions.0", "unet.up_blocks.0.upsamplers.0", "text_encoder_2.hidden_states.2",
                   "unet.time_embedding"}
