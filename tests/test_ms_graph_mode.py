"""Optional graph mode (``compile_for_graph`` / ``build_sdxl(graph=True)``) gives PyNative's results.

On the tiny SDXL with random weights: the UNet, both text encoders and the VAE decoder
compiled as MindSpore graphs return what PyNative returns (relative error within
``SAME_FRAMEWORK``; in practice bit-identical); recording always runs PyNative; a
compiled graph follows later weight changes and recompiles for structural ones (LoRA
injected, merged, rescaled); PyNative stays the default.  Also the whole UNet with
MindSpore's own Conv2D kernel (``impl="native"``) against the default im2col path
(``tests/test_ms_model.py`` checks single convolutions of both against torch).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lora_parity.parity.tolerances import LORA_EFFECT_MIN_ABS, SAME_FRAMEWORK, layer_tolerance

ms = pytest.importorskip("mindspore")

from lora_parity.backends.port import (  # noqa: E402
    SGM_UNET_PREFIX, UNetModel, build_sdxl, build_text_encoder, capture_activations, compile_for_graph,
    configure_cpu, inject_lora, load_params, lora_targets, merge_lora, sdxl_vector, set_conv_impl, structure_key,
    unmerge_lora, uses_graph)
from lora_parity.backends.port.graph import GRAPH_PHASE_PREFIX  # noqa: E402
from lora_parity.backends.port.layers import Conv2d, Linear  # noqa: E402
from lora_parity.convert.tiny import (TINY_LATENT_SHAPE, TINY_TE1_CONFIG, TINY_TE2_CONFIG,  # noqa: E402
                                      TINY_UNET_CONFIG, TINY_VAE_CONFIG)
from lora_parity.convert.layout import tiny_layout  # noqa: E402

pytestmark = pytest.mark.parity

Tensor = ms.Tensor
TOL = SAME_FRAMEWORK.rel
F32 = layer_tolerance("F32").rel
BATCH = 2
SEQ = 77


def rel_err(a, ref) -> float:
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _random_weights(cell, seed: int) -> dict[str, np.ndarray]:
    """Norm scales ~1, small vectors, fan-in scaled matrices, for every parameter of ``cell``."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in cell.get_parameters():
        shape = tuple(p.shape)
        if p.name.endswith("gamma"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) <= 1:
            v = 0.05 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))
        out[p.name] = v.astype(np.float32)
    return out


def _moved(a, b) -> bool:
    """The change (weights, LoRA) is visible in the output, far beyond float32 noise."""
    return float(np.abs(np.asarray(a, np.float64) - b).max()) > LORA_EFFECT_MIN_ABS


def _phases(cell) -> list[str]:
    """Graph phases compiled for ``cell`` by graph.run_graph."""
    return [k for k in cell.phase_cache if k.startswith(GRAPH_PHASE_PREFIX)]


@pytest.fixture(scope="module", autouse=True)
def _mindspore_cpu():
    configure_cpu()


@pytest.fixture(scope="module")
def comps():
    """Every component, graph mode on, one set of random weights."""
    c = build_sdxl(tiny_layout(), (TINY_TE1_CONFIG, TINY_TE2_CONFIG), TINY_VAE_CONFIG, graph=True)
    weights = {}
    for i, cell in enumerate(c.cells()):
        weights.update(_random_weights(cell, i))
    assert c.load(weights, strict=True) == ([], [])
    return c


@pytest.fixture(scope="module")
def token_ids() -> np.ndarray:
    rng = np.random.default_rng(7)
    ids = np.full((BATCH, SEQ), TINY_TE1_CONFIG["eos_token_id"], dtype=np.int32)
    ids[:, 0] = TINY_TE1_CONFIG["bos_token_id"]
    for row, n in zip(ids, (9, 30)):
        row[1: n + 1] = rng.integers(0, 512, n)
    return ids


@pytest.fixture(scope="module")
def unet_inputs():
    rng = np.random.default_rng(11)
    x = Tensor(rng.standard_normal((BATCH,) + TINY_LATENT_SHAPE[1:]).astype(np.float32))
    t = Tensor(np.array([437.0, 12.0], np.float32))
    ctx_dim = TINY_UNET_CONFIG["cross_attention_dim"]
    context = Tensor(rng.standard_normal((BATCH, SEQ, ctx_dim)).astype(np.float32))
    pooled = Tensor(rng.standard_normal((BATCH, 32)).astype(np.float32))
    y = sdxl_vector(pooled, (32, 32), (0, 0), (32, 32), TINY_UNET_CONFIG["addition_time_embed_dim"])
    return x, t, context, y


def _pynative(cell, *args):
    """``cell(*args)`` with graph mode off for the call."""
    was = uses_graph(cell)
    compile_for_graph(cell, False)
    try:
        return cell(*args)
    finally:
        compile_for_graph(cell, was)


def test_pynative_is_the_default():
    assert not any(uses_graph(c) for c in build_sdxl(tiny_layout(), vae_config=None).cells())
    assert ms.get_context("mode") == ms.PYNATIVE_MODE


def test_unet_graph_equals_pynative(comps, unet_inputs):
    unet = comps.unet
    assert uses_graph(unet)
    ref = _pynative(unet, *unet_inputs).asnumpy()
    out = unet(*unet_inputs).asnumpy()
    assert _phases(unet), "the call did not run as a graph"
    assert ms.get_context("mode") == ms.PYNATIVE_MODE  # restored after the call
    err = rel_err(out, ref)
    print(f"\nUNet graph vs PyNative relative error {err:.2e}")
    assert err <= TOL

    # recording needs PyNative: with capture_activations the graph cell runs PyNative, same output
    with capture_activations(unet) as acts:
        rec = unet(*unet_inputs).asnumpy()
    assert rel_err(rec, out) <= TOL
    assert {SGM_UNET_PREFIX + n for n in ("time_embed", "label_emb", "middle_block", "out")} <= set(acts)

    # weights loaded after compiling are used (no recompilation)
    n_phases = len(_phases(unet))
    p = next(q for q in unet.get_parameters() if q.name.endswith("out.2.weight"))
    old = p.asnumpy().copy()
    try:
        p.set_data(Tensor(old * 2.0))
        ref2 = _pynative(unet, *unet_inputs).asnumpy()
        assert _moved(ref2, ref)
        assert rel_err(unet(*unet_inputs).asnumpy(), ref2) <= TOL
        assert len(_phases(unet)) == n_phases
    finally:
        p.set_data(Tensor(old))
    assert rel_err(unet(*unet_inputs).asnumpy(), ref) <= TOL


def test_text_encoders_and_vae_graph_equal_pynative(comps, token_ids, unet_inputs):
    ids = Tensor(token_ids)
    for te in comps.text_encoders:
        h_ref, p_ref = (t.asnumpy() for t in _pynative(te, ids))
        h, p = (t.asnumpy() for t in te(ids))
        assert _phases(te)
        errs = (rel_err(h, h_ref), rel_err(p, p_ref))
        print(f"\n{te.sgm_prefix} graph vs PyNative relative errors {errs[0]:.2e} {errs[1]:.2e}")
        assert max(errs) <= TOL
    z = unet_inputs[0]
    ref = _pynative(comps.vae, z).asnumpy()
    out = comps.vae(z).asnumpy()
    assert _phases(comps.vae)
    assert out.shape == (BATCH, 3, 32, 32)
    err = rel_err(out, ref)
    print(f"VAE decoder graph vs PyNative relative error {err:.2e}")
    assert err <= TOL


def test_graph_recompiles_when_the_structure_changes(comps, token_ids):
    """LoRA injection, merge, a new scale: each is a new structure key, a new graph, PyNative's values."""
    # a graph-mode copy of the OpenCLIP-style encoder (fused attn.in_proj LoRA too; compiles in ~1 s)
    te = compile_for_graph(build_text_encoder(tiny_layout().text_encoders[1], TINY_TE2_CONFIG))
    assert load_params(te, {p.name: p.asnumpy() for p in comps.text_encoders[1].get_parameters()}) == []
    ids = Tensor(token_ids)
    base = te(ids)[0].asnumpy()
    key0 = structure_key(te)
    assert structure_key(te) == key0  # stable between calls

    rng = np.random.default_rng(5)
    shapes = {p.name: tuple(p.shape) for p in te.get_parameters()}
    lora = {}
    for layer in [t for t in lora_targets(te) if t.endswith(("attn.in_proj", "mlp.c_fc"))]:
        w = shapes.get(layer + ".weight") or shapes[layer + "_weight"]
        lora[layer + ".lora_A.weight"] = (rng.standard_normal((2, w[1])) / math.sqrt(w[1])).astype(np.float32)
        lora[layer + ".lora_B.weight"] = (0.5 * rng.standard_normal((w[0], 2))).astype(np.float32)
    inject_lora(te, lora, alpha=4.0)
    assert structure_key(te) != key0
    ref = _pynative(te, ids)[0].asnumpy()
    assert _moved(ref, base)  # the LoRA changes the output
    assert rel_err(te(ids)[0].asnumpy(), ref) <= TOL

    merge_lora(te)
    assert rel_err(te(ids)[0].asnumpy(), _pynative(te, ids)[0].asnumpy()) <= TOL
    unmerge_lora(te)
    assert rel_err(te(ids)[0].asnumpy(), ref) <= TOL  # back to a structure compiled before

    for cell in (c for _, c in te.cells_and_names() if isinstance(c, Linear) and c.lora_A is not None):
        cell.lora_scale *= 2.0
    ref2 = _pynative(te, ids)[0].asnumpy()
    assert _moved(ref2, ref)
    assert rel_err(te(ids)[0].asnumpy(), ref2) <= TOL
    assert len(_phases(te)) == 4  # base, LoRA, merged, rescaled


def test_unet_native_conv_matches_default(comps, unet_inputs):
    """MindSpore's Conv2D kernel (``impl="native"``) against the default im2col + MatMul path.

    Every convolution of the UNet on the input it really sees, and the whole UNet, within the
    float32 layer tolerance: the bar each path also meets against torch.  Only float32
    reassociation separates them, but over up to 9 * 192 products per output it reaches
    ~1.3e-6 relative, past ``SAME_FRAMEWORK`` (which the graph/PyNative tests above use).
    """
    unet = UNetModel(tiny_layout().unet)
    assert load_params(unet, {p.name: p.asnumpy() for p in comps.unet.get_parameters()}) == []
    convs = [c for _, c in unet.cells_and_names() if isinstance(c, Conv2d)]
    seen: list[tuple[Conv2d, np.ndarray]] = []
    handles = [c.register_forward_pre_hook(lambda cell, args: seen.append((cell, args[0].asnumpy())))
               for c in convs]
    ref = unet(*unet_inputs).asnumpy()
    for h in handles:
        h.remove()
    assert {id(c) for c, _ in seen} == {id(c) for c in convs}
    errs = []
    for conv, x in seen:
        default = conv(Tensor(x)).asnumpy()
        conv.impl = "native"
        errs.append(rel_err(conv(Tensor(x)).asnumpy(), default))
        conv.impl = "im2col"
    print(f"\nper-conv native vs im2col: max relative error {max(errs):.2e} over {len(errs)} convolutions")
    assert max(errs) <= F32

    assert set_conv_impl(unet, "native") == len(convs)
    err = rel_err(unet(*unet_inputs).asnumpy(), ref)
    print(f"whole UNet native vs im2col relative error {err:.2e}")
    assert err <= F32
    set_conv_impl(unet, "im2col")
    np.testing.assert_array_equal(unet(*unet_inputs).asnumpy(), ref)
