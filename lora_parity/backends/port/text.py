"""SDXL text encoders in MindSpore cells, in the SGM / MindONE parameter layouts.

* :class:`HFCLIPTextEncoder` -- CLIP-L as SGM wraps it (a HF ``CLIPTextModel`` under
  ``conditioner.embedders.0.transformer.``): ``text_model.embeddings.{token,position}_embedding``,
  ``text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
  layer_norm2}``, ``text_model.final_layer_norm``.  No ``position_ids`` parameter.
* :class:`OpenCLIPTextEncoder` -- OpenCLIP bigG under ``conditioner.embedders.1.model.``
  (``.0.`` in the refiner): ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection`` (width, proj), ``logit_scale``.

Both return ``(hidden, pooled)``: ``hidden`` is the output of encoder layer
``num_layers - 1`` (``hidden_states[-2]``, no final norm: what SDXL feeds to
cross-attention); ``pooled`` is the final-normed last layer at the EOT token
(the first position of ``eos_token_id``, or of the largest id when it is None),
multiplied by ``text_projection`` for OpenCLIP.

Where MindONE's ``gm`` encoders compute differently from transformers, :mod:`.numerics`
selects which (MindONE's by default): ``gm``'s CLIP-L runs ``quick_gelu`` as MindSpore's
``nn.GELU()`` (tanh approximation), both scale ``q`` by ``d ** -0.5`` before ``q @ k^T``,
mask with -1e5, take OpenCLIP's exact GELU from ``ops.gelu`` and softmax in the input dtype.
"""
from __future__ import annotations

import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from lora_parity.convert.layout import TextEncoderLayout
from lora_parity.backends.port import numerics as _nx
from lora_parity.backends.port.layers import (GM_MASK_VALUE, Embedding, LayerNorm, Linear, Recordable, _param, activation,
                     apply_activation, attention, causal_mask)

DEFAULT_ACT = {"hf": "quick_gelu", "openclip": "gelu"}


def _eot_index(ids: Tensor, eos_token_id: int | None) -> Tensor:
    if eos_token_id is None:
        return ops.argmax(ids.astype(ms.int32), -1)
    return ops.argmax((ids.astype(ms.int32) == eos_token_id).astype(ms.int32), -1)


def _causal(length: int, dtype, gm: bool) -> Tensor:
    """The text encoders' causal mask: ``gm``'s -1e5 in the activations' dtype (``attention_mask``
    numerics point), else -inf in float32."""
    if gm:
        return causal_mask(length, dtype, GM_MASK_VALUE)
    return causal_mask(length)


def _take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, L, D), idx (B,) -> (B, D)."""
    b = x.shape[0]
    flat = x.reshape(b * x.shape[1], x.shape[2])
    pos = ops.arange(0, b, dtype=ms.int32) * x.shape[1] + idx.astype(ms.int32)
    return ops.gather(flat, pos, 0)


# --------------------------------------------------------------------------- HF CLIP (CLIP-L)

class _Embeddings(nn.Cell):
    def __init__(self, vocab: int, positions: int, width: int):
        super().__init__()
        self.token_embedding = Embedding(vocab, width)
        self.position_embedding = Embedding(positions, width)

    def construct(self, ids):
        length = ids.shape[-1]
        pos = ops.arange(0, length, dtype=ms.int32)
        return self.token_embedding(ids) + self.position_embedding(pos).reshape(1, length, -1)


class _HFAttention(nn.Cell):
    NUMERICS_POINTS = ("attention_scale", "compute_dtype")

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        _nx.stamp(self, self.NUMERICS_POINTS)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.q_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def construct(self, x, mask):
        # gm's CLIPAttention: q_proj(x) * d**-0.5, then q @ k^T + mask, softmax in the input dtype
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask,
                        "q" if self.mindone_attention_scale else "mul", not self.mindone_compute_dtype)
        return self.out_proj(out)


class _HFMLP(nn.Cell):
    NUMERICS_POINTS = ("gelu_formula", "clip_l_activation")

    def __init__(self, width: int, inner: int, act: str):
        super().__init__()
        self.fc1 = Linear(width, inner)
        self.fc2 = Linear(inner, width)
        activation(act)  # validates the name
        self.act_name = act
        _nx.stamp(self, self.NUMERICS_POINTS)

    def construct(self, x):
        h = apply_activation(self.fc1(x), self.act_name, self.mindone_gelu_formula, self.mindone_clip_l_activation)
        return self.fc2(h)


class _HFLayer(nn.Cell):
    def __init__(self, width: int, inner: int, heads: int, act: str, eps: float):
        super().__init__()
        self.self_attn = _HFAttention(width, heads)
        self.layer_norm1 = LayerNorm(width, eps)
        self.mlp = _HFMLP(width, inner, act)
        self.layer_norm2 = LayerNorm(width, eps)

    def construct(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class _HFEncoder(nn.Cell):
    def __init__(self, n: int, width: int, inner: int, heads: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.CellList([_HFLayer(width, inner, heads, act, eps) for _ in range(n)])


class _HFTextModel(nn.Cell):
    def __init__(self, layout: TextEncoderLayout, act: str, eps: float):
        super().__init__()
        self.embeddings = _Embeddings(layout.vocab_size, layout.max_position_embeddings, layout.hidden_size)
        self.encoder = _HFEncoder(layout.num_layers, layout.hidden_size, layout.intermediate_size,
                                  layout.num_heads, act, eps)
        self.final_layer_norm = LayerNorm(layout.hidden_size, eps)


class HFCLIPTextEncoder(Recordable):
    """CLIP-L text encoder with HF names under ``sgm_prefix`` (default ``layout.sgm_prefix``).

    ``enc(input_ids) -> (hidden_states[-2], pooled)``; records ``text_model.embeddings``,
    ``text_model.encoder.layers.i``, ``text_model.final_layer_norm`` and ``pooled``.
    """

    NUMERICS_POINTS = ("attention_mask",)

    def __init__(self, layout: TextEncoderLayout, hidden_act: str | None = None, *,
                 sgm_prefix: str | None = None, layer_norm_eps: float = 1e-5,
                 eos_token_id: int | None = None, hidden_layer: int = -2):
        super().__init__(layout.sgm_prefix if sgm_prefix is None else sgm_prefix)
        self.layout = layout
        self.hidden_act = hidden_act or DEFAULT_ACT["hf"]
        self.eos_token_id = eos_token_id
        # index into HF's hidden_states tuple (embeddings, layer 0 out, ..., last layer out)
        self.hidden_layer = hidden_layer % (layout.num_layers + 1)
        self.text_model = _HFTextModel(layout, self.hidden_act, layer_norm_eps)
        _nx.stamp(self, self.NUMERICS_POINTS)
        self._finish()

    def construct(self, input_ids):
        ids = input_ids if isinstance(input_ids, Tensor) else Tensor(np.asarray(input_ids), ms.int32)
        x = self.text_model.embeddings(ids)
        mask = _causal(ids.shape[-1], x.dtype, self.mindone_attention_mask)
        x = self._rec("text_model.embeddings", x)
        hidden = x if self.hidden_layer == 0 else None
        for i, layer in enumerate(self.text_model.encoder.layers):
            x = layer(x, mask)
            x = self._rec(f"text_model.encoder.layers.{i}", x)
            if i + 1 == self.hidden_layer:
                hidden = x
        last = self.text_model.final_layer_norm(x)
        last = self._rec("text_model.final_layer_norm", last)
        pooled = _take_rows(last, _eot_index(ids, self.eos_token_id))
        pooled = self._rec("pooled", pooled)
        return hidden, pooled


# --------------------------------------------------------------------------- OpenCLIP (bigG)

class _LoRAPair(nn.Cell):
    """``lora_A`` (r, in) / ``lora_B`` (out, r) for a fused projection (OpenCLIP ``attn.in_proj``)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float):
        super().__init__()
        self.lora_A = Linear(in_features, r, bias=False)
        self.lora_B = Linear(r, out_features, bias=False)
        self.scale = float(scale)
        self.merged = False

    def construct(self, x):
        return self.lora_B(self.lora_A(x)) * self.scale


class MultiheadAttention(nn.Cell):
    """``torch.nn.MultiheadAttention`` layout: ``in_proj_weight`` (3W, W), ``in_proj_bias``, ``out_proj``."""

    NUMERICS_POINTS = ("attention_scale", "compute_dtype")

    def __init__(self, width: int, heads: int):
        super().__init__()
        _nx.stamp(self, self.NUMERICS_POINTS)
        self.width = width
        self.heads = heads
        self.in_proj_weight = _param((3 * width, width), "in_proj_weight")
        self.in_proj_bias = _param((3 * width,), "in_proj_bias")
        self.out_proj = Linear(width, width)
        self.in_proj = None  # a _LoRAPair once a LoRA targets "attn.in_proj"
        self._matmul = ops.MatMul(transpose_b=True)

    def construct(self, x, mask):
        b, length, w = x.shape
        x2 = x.reshape(b * length, w)
        qkv = self._matmul(x2, self.in_proj_weight.astype(x.dtype)) + self.in_proj_bias.astype(x.dtype)
        if self.in_proj is not None and not self.in_proj.merged:
            qkv = qkv + self.in_proj(x2)
        qkv = qkv.reshape(b, length, 3 * w)
        q = qkv[:, :, :w]
        k = qkv[:, :, w: 2 * w]
        v = qkv[:, :, 2 * w:]
        # gm: q * head_dim**-0.5 before q @ k^T (+ mask), nn.Softmax in the input dtype
        return self.out_proj(attention(q, k, v, self.heads, mask, "q" if self.mindone_attention_scale else "mul",
                                       not self.mindone_compute_dtype))


class _OCMLP(nn.Cell):
    NUMERICS_POINTS = ("gelu_formula",)

    def __init__(self, width: int, inner: int, act: str):
        super().__init__()
        self.c_fc = Linear(width, inner)
        self.c_proj = Linear(inner, width)
        activation(act)  # validates the name
        self.act_name = act
        _nx.stamp(self, self.NUMERICS_POINTS)

    def construct(self, x):
        return self.c_proj(apply_activation(self.c_fc(x), self.act_name, self.mindone_gelu_formula))


class _OCBlock(nn.Cell):
    def __init__(self, width: int, inner: int, heads: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps)
        self.mlp = _OCMLP(width, inner, act)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class _OCTransformer(nn.Cell):
    def __init__(self, n: int, width: int, inner: int, heads: int, act: str, eps: float):
        super().__init__()
        self.resblocks = nn.CellList([_OCBlock(width, inner, heads, act, eps) for _ in range(n)])


class OpenCLIPTextEncoder(Recordable):
    """OpenCLIP (bigG) text tower with SGM names under ``sgm_prefix`` (default ``layout.sgm_prefix``).

    ``enc(input_ids) -> (hidden_states[-2], pooled @ text_projection)``; records
    ``token_embedding`` (token + positional), ``transformer.resblocks.i``, ``ln_final`` and
    ``text_projection`` (the projected pooled output).
    """

    NUMERICS_POINTS = ("attention_mask",)

    def __init__(self, layout: TextEncoderLayout, hidden_act: str | None = None, *,
                 sgm_prefix: str | None = None, layer_norm_eps: float = 1e-5,
                 eos_token_id: int | None = None, hidden_layer: int = -2, with_logit_scale: bool = True):
        super().__init__(layout.sgm_prefix if sgm_prefix is None else sgm_prefix)
        self.layout = layout
        self.hidden_act = hidden_act or DEFAULT_ACT["openclip"]
        self.eos_token_id = eos_token_id
        self.hidden_layer = hidden_layer % (layout.num_layers + 1)
        w = layout.hidden_size
        self.token_embedding = Embedding(layout.vocab_size, w)
        self.positional_embedding = _param((layout.max_position_embeddings, w), "positional_embedding")
        self.transformer = _OCTransformer(layout.num_layers, w, layout.intermediate_size, layout.num_heads,
                                          self.hidden_act, layer_norm_eps)
        self.ln_final = LayerNorm(w, layer_norm_eps)
        self.text_projection = _param((w, layout.projection_dim or w), "text_projection")
        if with_logit_scale:  # present (unused) in SGM / MindONE checkpoints
            self.logit_scale = Parameter(Tensor(math.log(1 / 0.07), ms.float32), name="logit_scale")
        _nx.stamp(self, self.NUMERICS_POINTS)
        self._finish()

    def construct(self, input_ids):
        ids = input_ids if isinstance(input_ids, Tensor) else Tensor(np.asarray(input_ids), ms.int32)
        length = ids.shape[-1]
        x = self.token_embedding(ids) + self.positional_embedding[:length].reshape(1, length, -1)
        mask = _causal(length, x.dtype, self.mindone_attention_mask)
        x = self._rec("token_embedding", x)
        hidden = x if self.hidden_layer == 0 else None
        for i, block in enumerate(self.transformer.resblocks):
            x = block(x, mask)
            x = self._rec(f"transformer.resblocks.{i}", x)
            if i + 1 == self.hidden_layer:
                hidden = x
        last = self.ln_final(x)
        last = self._rec("ln_final", last)
        pooled = _take_rows(last, _eot_index(ids, self.eos_token_id))
        pooled = ops.matmul(pooled, self.text_projection.astype(pooled.dtype))
        pooled = self._rec("text_projection", pooled)
        return hidden, pooled


def build_text_encoder(layout: TextEncoderLayout, hf_config: dict | None = None, **kwargs) -> Recordable:
    """The cell for ``layout.style`` (``hf``, ``openclip``, ``ldm``); activation and LayerNorm eps from a HF
    ``CLIPTextConfig`` dict."""
    if hf_config is not None:
        kwargs.setdefault("hidden_act", hf_config.get("hidden_act"))
        kwargs.setdefault("layer_norm_eps", float(hf_config.get("layer_norm_eps", 1e-5)))
    if layout.style == "hf":
        return HFCLIPTextEncoder(layout, **kwargs)
    if layout.style == "openclip":
        return OpenCLIPTextEncoder(layout, **kwargs)
    if layout.style == "ldm":  # MindONE's SD 1.x / 2.x TextEncoder; HF pools at the config's eos token
        from lora_parity.backends.port.ldm_text import LDMTextEncoder

        if hf_config is not None:
            kwargs.setdefault("eos_token_id", hf_config.get("eos_token_id"))
        return LDMTextEncoder(layout, **kwargs)
    raise ValueError(f"unknown text encoder style {layout.style!r}")
