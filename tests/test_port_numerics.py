"""The port's numerics modes (lora_parity.backends.port.numerics): selection and each branch.

* selection: "mindone" is the default; ``$LORA_PARITY_PORT_NUMERICS``, :func:`set_numerics` and
  the :func:`use_numerics` context select; specs add / remove single points;
* every MindONE (``gm``) branch against its definition -- the MindSpore ops ``gm`` calls, or a
  numpy re-computation of ``gm``'s formula -- and against the diffusers branch (how far apart);
* graph mode compiles and equals PyNative in both modes; :func:`apply_numerics` re-stamps a
  built cell and its graph recompiles.

Tiny shapes, no diffusers: the diffusers-exact branches are held to PyTorch by test_ms_model.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore import Tensor, ops  # noqa: E402

from lora_parity.backends.port import (  # noqa: E402
    NUMERICS, POINTS, HFCLIPTextEncoder, OpenCLIPTextEncoder, UNetModel, VAEDecoder, apply_numerics,
    compile_for_graph, configure_cpu, current, current_numerics, inject_lora, merge_lora, set_numerics,
    unmerge_lora, use_numerics)
from lora_parity.backends.port import numerics as nx  # noqa: E402
from lora_parity.parity.tolerances import OP_DEFINITION, OP_DEFINITION_ABS, SINUSOID_FP32  # noqa: E402
from lora_parity.backends.port.layers import (GroupNorm, SiLU, apply_activation, attention,  # noqa: E402
                                                   causal_mask, gelu, make_conv)
from lora_parity.backends.port.model import load_params  # noqa: E402
from lora_parity.backends.port.text import _HFMLP  # noqa: E402
from lora_parity.backends.port.unet import (ConcatTimestepEmbedderND, CrossAttention,  # noqa: E402
                                                 timestep_embedding, timestep_frequencies)
from lora_parity.convert.layout import UNetLayout, sdxl_text_encoders  # noqa: E402
from lora_parity.convert.tiny import (TINY_LATENT_SHAPE, TINY_TE1_CONFIG, TINY_TE2_CONFIG, TINY_UNET_CONFIG,  # noqa: E402
                              TINY_VAE_CONFIG)

SEQ = 77


@pytest.fixture(scope="module", autouse=True)
def _mindspore_cpu():
    configure_cpu()


@pytest.fixture(autouse=True)
def _no_selection(monkeypatch):
    """Each test starts from nothing selected and no environment variable, and leaves it so."""
    monkeypatch.delenv(nx.ENV_VAR, raising=False)
    old = set_numerics(None)
    yield
    nx._restore(old)


def _random_weights(cell, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vals = {}
    for p in cell.get_parameters():
        shape = tuple(p.shape)
        if p.name.endswith(("gamma", "beta")):
            v = (1.0 if p.name.endswith("gamma") else 0.0) + 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else (shape[0] if shape else 1)
            v = rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))
        vals[p.name] = v.astype(np.float32)
    assert load_params(cell, vals) == []


def _ids() -> np.ndarray:
    rng = np.random.default_rng(7)
    ids = np.full((2, SEQ), TINY_TE1_CONFIG["eos_token_id"], dtype=np.int32)
    ids[:, 0] = TINY_TE1_CONFIG["bos_token_id"]
    for row, n in zip(ids, (9, 30)):
        row[1: n + 1] = rng.integers(0, 512, n)
    return ids


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


# --------------------------------------------------------------------------- selection

def test_default_is_mindone():
    assert NUMERICS == ("mindone", "diffusers")
    assert current() == "mindone"
    sel = current_numerics()
    # two points are opt-in: MindSpore's conv kernel (slow) and gm's tanh-GELU CLIP-L (a base-model property)
    assert sel.points == nx.MINDONE_DEFAULT == frozenset(POINTS) - {"conv_kernel", "clip_l_activation"}
    assert sel.spec == "mindone" and nx.parse("diffusers").points == frozenset()


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv(nx.ENV_VAR, "diffusers")
    assert current() == "diffusers" and not nx.uses("timestep_freqs")
    monkeypatch.setenv(nx.ENV_VAR, "mindone:-clip_l_activation")
    assert current() == "mindone"
    assert current_numerics().points == nx.MINDONE_DEFAULT - {"clip_l_activation"}
    monkeypatch.setenv(nx.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=nx.ENV_VAR):
        current()
    # an explicit selection wins over the environment
    with use_numerics("mindone"):
        assert current() == "mindone"


def test_set_numerics_and_context_manager(monkeypatch):
    monkeypatch.setenv(nx.ENV_VAR, "mindone")
    assert set_numerics("diffusers") is None
    assert current() == "diffusers"
    with use_numerics("mindone", points=["timestep_freqs"]) as sel:
        assert current() == "mindone" and sel.points == {"timestep_freqs"}
        assert nx.uses("timestep_freqs") and not nx.uses("attention_scale")
    assert current() == "diffusers"
    set_numerics(None)  # back to the environment
    assert current() == "mindone"


@pytest.mark.parametrize("spec, points", [
    ("mindone", nx.MINDONE_DEFAULT),
    ("diffusers", frozenset()),
    ("mindone:timestep_freqs,lora_merge", {"timestep_freqs", "lora_merge"}),
    ("mindone:+conv_kernel", nx.MINDONE_DEFAULT | {"conv_kernel"}),
    ("diffusers:+timestep_freqs", {"timestep_freqs"}),
    (" Mindone : -clip_l_activation , -attention_mask ", nx.MINDONE_DEFAULT - {"clip_l_activation", "attention_mask"}),
])
def test_specs(spec, points):
    sel = nx.parse(spec)
    assert sel.points == points
    assert nx.parse(sel.spec) == sel  # the canonical spec reads back


@pytest.mark.parametrize("bad", ["pytorch", "mindone:nope", "mindone:timestep_freqs,-gelu_formula"])
def test_bad_specs(bad):
    with pytest.raises(ValueError):
        nx.parse(bad)
    with pytest.raises(ValueError):
        nx.parse("mindone").uses("nope")


def test_cells_take_the_mode_when_built_and_apply_numerics_restamps():
    with use_numerics("diffusers"):
        att = CrossAttention(16, None, 2, 8)
    assert (att.mindone_attention_scale, att.mindone_compute_dtype) == (False, False)
    with use_numerics("mindone"):
        att2 = CrossAttention(16, None, 2, 8)
    assert att2.mindone_attention_scale and att2.mindone_compute_dtype
    assert att.mindone_attention_scale is False  # built cells keep their mode ...
    assert apply_numerics(att, "mindone") == 1  # ... until re-stamped
    assert att.mindone_attention_scale


def test_conv_kernel_is_opt_in():
    assert make_conv(4, 4).impl == "im2col"  # "mindone" keeps the fast im2col convolution
    with use_numerics("mindone:+conv_kernel"):
        conv = make_conv(4, 4)
    assert conv.impl == "native"
    apply_numerics(conv, "mindone")
    assert conv.impl == "im2col"


# --------------------------------------------------------------------------- the branches

@pytest.mark.parametrize("dim", [8, 32, 256, 320])
def test_timestep_freqs_mindone_is_gm_formula(dim):
    """gm: freqs = ops.exp(-ops.log(ones(1) * P) * ops.arange(half) / half) -- MindSpore's Exp on the
    float32 exponent numpy forms the same way; diffusers: exp rounded once (float64)."""
    half = dim // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    gm = ops.exp(Tensor(exponent)).asnumpy()
    exact = np.exp(exponent.astype(np.float64)).astype(np.float32)
    mind = timestep_frequencies(half, exact=False).asnumpy()
    diff = timestep_frequencies(half, exact=True).asnumpy()
    np.testing.assert_array_equal(mind, gm)
    np.testing.assert_array_equal(diff, exact)
    assert _ulps(mind, diff).max() <= 64  # MindSpore 2.10's CPU Exp: up to ~50 ulp

    t = np.array([999.0, 500.0, 1.0, 1024.0], np.float32)
    with use_numerics("mindone"):
        emb = timestep_embedding(t, dim).asnumpy()
    args = (t[:, None] * gm[None, :]).astype(np.float64)  # one float32 product, as MindSpore's Mul
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), rtol=SINUSOID_FP32.rtol, atol=SINUSOID_FP32.atol)
    with use_numerics("diffusers"):
        emb_d = timestep_embedding(t, dim).asnumpy()
    assert 0 < np.abs(emb - emb_d).max() < 5e-3  # t ~ 1000 amplifies the frequency's ulps (~2e-3 at dim 320)

    with use_numerics("mindone"):  # the size / crop / target embedders use the same frequencies
        cond = ConcatTimestepEmbedderND(dim)(Tensor(t.reshape(2, 2))).asnumpy()
    np.testing.assert_array_equal(cond, emb.reshape(2, -1))


def test_gelu_formula_mindone_is_ops_gelu():
    x = Tensor(np.linspace(-6, 6, 20001, dtype=np.float32))
    mind = gelu(x, mindone=True).asnumpy()
    np.testing.assert_array_equal(mind, ops.gelu(x, approximate="none").asnumpy())
    xd = x.asnumpy().astype(np.float64)
    ref = xd * 0.5 * (1.0 + np.vectorize(math.erf)(xd / math.sqrt(2.0)))
    torch_formula = gelu(x).asnumpy()
    np.testing.assert_allclose(mind, ref, rtol=OP_DEFINITION_ABS.rtol, atol=OP_DEFINITION_ABS.atol)
    assert np.abs(mind - torch_formula).max() < 1e-6


def test_clip_l_activation_mindone_is_tanh_gelu():
    """gm's HF-CLIP port: ACT2FN["quick_gelu"] is MindSpore's nn.GELU(), approximate=True (tanh)."""
    x = Tensor(np.linspace(-6, 6, 20001, dtype=np.float32))
    xd = x.asnumpy().astype(np.float64)
    tanh_ref = 0.5 * xd * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd ** 3)))
    gm = apply_activation(x, "quick_gelu", gm_hf_clip=True).asnumpy()
    np.testing.assert_allclose(gm, tanh_ref, rtol=OP_DEFINITION_ABS.rtol, atol=OP_DEFINITION_ABS.atol)
    np.testing.assert_array_equal(gm, ms.nn.GELU()(x).asnumpy())
    quick = apply_activation(x, "quick_gelu").asnumpy()
    assert 0.015 < np.abs(gm - quick).max() < 0.025  # not an ulp effect

    with use_numerics("mindone:+clip_l_activation"):
        mlp = _HFMLP(8, 16, "quick_gelu")
    _random_weights(mlp, 1)
    h = Tensor(np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32))
    np.testing.assert_array_equal(mlp(h).asnumpy(), mlp.fc2(ops.gelu(mlp.fc1(h), approximate="tanh")).asnumpy())
    apply_numerics(mlp, "diffusers")
    np.testing.assert_array_equal(mlp(h).asnumpy(), mlp.fc2(mlp.fc1(h) * ops.sigmoid(1.702 * mlp.fc1(h))).asnumpy())


def test_attention_scale_branches():
    """gm UNet/VAE: softmax(q k^T / sqrt(d)); gm text encoders: softmax((q * d**-0.5) k^T + mask)."""
    rng = np.random.default_rng(3)
    b, length, heads, d = 2, 7, 2, 8  # sqrt(8) is not a power of two: the branches round differently
    q, k, v = (Tensor(rng.standard_normal((b, length, heads * d)).astype(np.float32)) for _ in range(3))

    def split(t):
        return t.reshape(b, length, heads, d).transpose(0, 2, 1, 3)

    def merge(t):
        return t.transpose(0, 2, 1, 3).reshape(b, length, heads * d)

    mask = causal_mask(length, fill=-1e5)
    div = merge(ops.matmul(ops.softmax(ops.matmul(split(q), split(k).transpose(0, 1, 3, 2)) / (d ** 0.5), -1),
                           split(v)))
    np.testing.assert_array_equal(attention(q, k, v, heads, None, "div", False).asnumpy(), div.asnumpy())
    qs = merge(ops.matmul(ops.softmax(ops.matmul(split(q * (d ** -0.5)), split(k).transpose(0, 1, 3, 2)) + mask, -1),
                          split(v)))
    np.testing.assert_array_equal(attention(q, k, v, heads, mask, "q", False).asnumpy(), qs.asnumpy())
    ref = attention(q, k, v, heads).asnumpy()
    for scale in ("div", "q"):
        assert np.abs(attention(q, k, v, heads, None, scale).asnumpy() - ref).max() < 1e-6


def test_attention_mask_minus_1e5_equals_minus_inf_in_float32():
    with use_numerics("mindone:-attention_mask"):
        te = HFCLIPTextEncoder(sdxl_text_encoders(TINY_TE1_CONFIG, TINY_TE2_CONFIG)[0], TINY_TE1_CONFIG["hidden_act"])
    _random_weights(te, 2)
    ids = Tensor(_ids())
    inf_mask = [o.asnumpy() for o in te(ids)]
    apply_numerics(te, "mindone")
    assert te.mindone_attention_mask
    for a, b in zip(te(ids), inf_mask):
        np.testing.assert_array_equal(a.asnumpy(), b)


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
def test_compute_dtype_groupnorm_and_softmax(dtype):
    x = Tensor(np.random.default_rng(4).standard_normal((2, 16, 4, 4)).astype(np.float32)).astype(dtype)
    with use_numerics("mindone"):
        gn = GroupNorm(4, 16)
    _random_weights(gn, 5)
    in_dtype = ops.group_norm(x, 4, gn.gamma.astype(dtype), gn.beta.astype(dtype), 1e-5)
    np.testing.assert_array_equal(gn(x).asnumpy(), in_dtype.asnumpy())  # gm's nn.GroupNorm
    apply_numerics(gn, "diffusers")
    fp32 = ops.group_norm(x.astype(ms.float32), 4, gn.gamma, gn.beta, 1e-5).astype(dtype)
    np.testing.assert_array_equal(gn(x).asnumpy(), fp32.asnumpy())
    if dtype == ms.float32:
        np.testing.assert_array_equal(in_dtype.asnumpy(), fp32.asnumpy())  # no effect in float32


def test_silu_kernel():
    x = Tensor(np.linspace(-8, 8, 4001, dtype=np.float32))
    with use_numerics("mindone"):
        act = SiLU()
    np.testing.assert_array_equal(act(x).asnumpy(), ops.silu(x).asnumpy())
    apply_numerics(act, "diffusers")
    np.testing.assert_array_equal(act(x).asnumpy(), (x * ops.sigmoid(x)).asnumpy())


def test_vae_latent_scale():
    """gm decodes ``1.0 / scale_factor * z``; diffusers ``z / scaling_factor``."""
    with use_numerics("mindone"):
        vae = VAEDecoder.from_diffusers_config(TINY_VAE_CONFIG)
    _random_weights(vae, 6)
    z = np.random.default_rng(5).standard_normal(TINY_LATENT_SHAPE).astype(np.float32)
    sf = TINY_VAE_CONFIG["scaling_factor"]
    np.testing.assert_array_equal(vae(Tensor(z)).asnumpy(),
                                  vae(Tensor(np.float32(1.0 / sf) * z), scaled=False).asnumpy())
    apply_numerics(vae, "diffusers")
    np.testing.assert_array_equal(vae(Tensor(z)).asnumpy(), vae(Tensor(z / np.float32(sf)), scaled=False).asnumpy())


def test_lora_merge_as_gm_set_train_false():
    """gm: ops.assign(W, W + ops.matmul(B, A) * scaling) in the weight's dtype; diffusers: float64, rounded once."""
    rng = np.random.default_rng(6)
    te = HFCLIPTextEncoder(sdxl_text_encoders(TINY_TE1_CONFIG, TINY_TE2_CONFIG)[0], TINY_TE1_CONFIG["hidden_act"])
    _random_weights(te, 7)
    layer = te.text_model.encoder.layers[0].self_attn.q_proj
    name = te.sgm_prefix + "text_model.encoder.layers.0.self_attn.q_proj"
    w0 = layer.weight.asnumpy().copy()
    width = w0.shape[1]
    a = rng.standard_normal((4, width)).astype(np.float32)
    b = rng.standard_normal((width, 4)).astype(np.float32) * 0.1
    inject_lora(te, {name + ".lora_A.weight": a, name + ".lora_B.weight": b}, alpha=2.0)  # scale 0.5
    gm_w = (Tensor(w0) + ops.matmul(Tensor(b), Tensor(a)) * 0.5).asnumpy()
    exact_w = (w0.astype(np.float64) + 0.5 * (b.astype(np.float64) @ a)).astype(np.float32)

    with use_numerics("mindone"):
        assert merge_lora(te) == 1
    np.testing.assert_array_equal(layer.weight.asnumpy(), gm_w)
    with use_numerics("mindone"):
        assert unmerge_lora(te) == 1
    np.testing.assert_array_equal(layer.weight.asnumpy(),
                                  (Tensor(gm_w) - ops.matmul(Tensor(b), Tensor(a)) * 0.5).asnumpy())

    layer.weight.set_data(Tensor(w0))
    merge_lora(te, numerics="diffusers")
    np.testing.assert_array_equal(layer.weight.asnumpy(), exact_w)
    gap = np.abs(gm_w.astype(np.float64) - exact_w).max()
    assert 0 < gap <= 4 * np.finfo(np.float32).eps * np.abs(exact_w).max()  # rounding only


# --------------------------------------------------------------------------- graph mode, both modes

def test_graph_mode_in_both_modes_and_recompiles_on_restamp():
    te1_layout, te2_layout = sdxl_text_encoders(TINY_TE1_CONFIG, TINY_TE2_CONFIG)
    ids = Tensor(_ids())
    ref = {}
    for mode in NUMERICS:
        spec = "mindone:+clip_l_activation" if mode == "mindone" else mode  # a point that moves the output
        with use_numerics(spec):
            te1 = HFCLIPTextEncoder(te1_layout, TINY_TE1_CONFIG["hidden_act"])
            te2 = OpenCLIPTextEncoder(te2_layout, TINY_TE2_CONFIG["hidden_act"])
        _random_weights(te1, 8)
        _random_weights(te2, 9)
        for te in (te1, te2):
            py = [o.asnumpy() for o in te(ids)]
            compile_for_graph(te)
            for g, p in zip(te(ids), py):
                np.testing.assert_array_equal(g.asnumpy(), p)
        ref[mode] = (te1, [o.asnumpy() for o in te1(ids)])
    assert np.abs(ref["mindone"][1][0] - ref["diffusers"][1][0]).max() > 1e-3  # clip_l_activation
    te1 = ref["mindone"][0]  # graph compiled as "mindone": re-stamped, it recompiles as "diffusers"
    apply_numerics(te1, "diffusers")
    for g, p in zip(te1(ids), ref["diffusers"][1]):
        np.testing.assert_array_equal(g.asnumpy(), p)


def test_unet_and_vae_graph_mode_mindone():
    """The UNet's and the VAE's MindONE branches (MindSpore Exp frequencies, ops.gelu, scores / sqrt(d),
    SiLU kernel, 1/scale * z) compile and equal PyNative; the diffusers mode: tests/test_ms_graph_mode.py."""
    with use_numerics("mindone"):
        unet = UNetModel(UNetLayout.from_diffusers_config(TINY_UNET_CONFIG))
        vae = VAEDecoder.from_diffusers_config(TINY_VAE_CONFIG)
    _random_weights(unet, 10)
    _random_weights(vae, 11)
    rng = np.random.default_rng(12)
    x = Tensor(rng.standard_normal((2,) + TINY_LATENT_SHAPE[1:]).astype(np.float32))
    t = Tensor(np.array([437.0, 12.0], np.float32))
    ctx = Tensor(rng.standard_normal((2, SEQ, TINY_UNET_CONFIG["cross_attention_dim"])).astype(np.float32))
    y = Tensor(rng.standard_normal((2, TINY_UNET_CONFIG["projection_class_embeddings_input_dim"])).astype(np.float32))
    py_u, py_v = unet(x, t, ctx, y).asnumpy(), vae(x).asnumpy()
    compile_for_graph(unet)
    compile_for_graph(vae)
    np.testing.assert_array_equal(unet(x, t, ctx, y).asnumpy(), py_u)
    np.testing.assert_array_equal(vae(x).asnumpy(), py_v)
    with use_numerics("diffusers"):  # a built cell keeps its mode whatever is selected later
        np.testing.assert_array_equal(unet(x, t, ctx, y).asnumpy(), py_u)
