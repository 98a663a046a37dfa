"""The SD 1.x / 2.x text encoder as MindONE's LDM code holds it, in MindSpore cells.

MindONE's ``examples/stable_diffusion_v2`` (``ldm/modules/encoders/text_encoder.py``, ``TextEncoder`` under
``FrozenCLIPEmbedder``; read at zhtmike/mindone 831bcaf14bfb, facts only) runs CLIP-L (SD 1.x, 12 layers) and
OpenCLIP-H (SD 2.x, the 23 layers its config keeps: the released model's penultimate layer) with the same cell.
Its names are what MindONE's SD LoRA ``.ckpt`` files target, so the port keeps them exactly
(``tools/model_conversion/ms_names_v1.txt`` / ``_v2.txt``), under ``cond_stage_model.transformer.``:
``embedding_table``, ``positional_embedding``, ``transformer_layer.resblocks.N.{ln_1, attn.attn.in_proj,
attn.attn.out_proj, ln_2, c_fc, c_proj}``, ``ln_final``.  q/k/v are one fused Dense (``in_proj``, (3W, W)), so
a LoRA on it is one ``lora_down`` / ``lora_up`` pair.

What it computes (and what the port does): token + position embedding; per block ``x + attn(ln_1(x))``,
``x + c_proj(act(c_fc(ln_2(x))))``; ``ln_final`` of the **last** block is the UNet's context (diffusers'
``last_hidden_state``: the final layer norm applied to the last layer, for SD 1.x and 2.x alike).  Attention
scales ``q`` by ``d ** -0.5`` before ``q @ k^T`` (the ``attention_scale`` point), adds a causal ``-inf`` mask
(float32 ``np.triu``: no ``-1e5`` here, unlike ``gm``), softmax in the input dtype (``compute_dtype``);
LayerNorm in float32 (its own subclass casts).  The activation is ``QuickGELU`` ``x * sigmoid(1.702 x)``
(SD 1.x, ``use_quick_gelu: True``) or ``nn.GELU()`` (SD 2.x), MindSpore's default being the *tanh*
approximation: under the opt-in ``clip_l_activation`` point, the same fact about MindONE's CLIP ports as for
``gm`` (exact erf GELU otherwise, as transformers).  MindONE's encoder returns no pooled output; the port also
records ``pooled`` (the final-normed state at the end-of-text token, HF's ``pooler_output``) so the
aligner can compare it, though nothing downstream uses it.
"""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from lora_parity.convert.layout import TextEncoderLayout
from lora_parity.backends.port import numerics as _nx
from lora_parity.backends.port.layers import (LORA_SPELLINGS, LayerNorm, Linear, Recordable, _param, activation, apply_activation,
                                             attention, causal_mask)

DEFAULT_ACT = {"sd1": "quick_gelu", "sd2": "gelu"}


class _FusedAttention(nn.Cell):
    """MindONE's ``MultiheadAttention``: one Dense ``in_proj`` (q, k, v stacked on rows) and ``out_proj``."""

    NUMERICS_POINTS = ("attention_scale", "compute_dtype")

    def __init__(self, width: int, heads: int):
        super().__init__()
        _nx.stamp(self, self.NUMERICS_POINTS)
        self.width, self.heads = int(width), int(heads)
        self.in_proj = Linear(width, 3 * width)
        self.out_proj = Linear(width, width)

    def construct(self, x, mask):
        qkv = self.in_proj(x)
        w = self.width
        q, k, v = qkv[:, :, :w], qkv[:, :, w: 2 * w], qkv[:, :, 2 * w:]
        out = attention(q, k, v, self.heads, mask, "q" if self.mindone_attention_scale else "mul",
                        not self.mindone_compute_dtype)
        return self.out_proj(out)


class _AttentionWithMask(nn.Cell):
    """The ``attn.attn`` nesting of MindONE's names (``AttentionWithMask`` holding ``MultiheadAttention``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = _FusedAttention(width, heads)

    def construct(self, x, mask):
        return self.attn(x, mask)


class _ResidualBlock(nn.Cell):
    NUMERICS_POINTS = ("gelu_formula", "clip_l_activation")

    def __init__(self, width: int, inner: int, heads: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps)
        self.attn = _AttentionWithMask(width, heads)
        self.ln_2 = LayerNorm(width, eps)
        self.c_fc = Linear(width, inner)
        self.c_proj = Linear(inner, width)
        activation(act)  # validates the name
        self.act_name = act
        _nx.stamp(self, self.NUMERICS_POINTS)

    def _act(self, h):
        # MindONE: QuickGELU is its own exact formula; "gelu" is nn.GELU(), tanh unless the opt-in point is off
        if self.act_name == "gelu" and self.mindone_clip_l_activation:
            return ops.gelu(h, approximate="tanh")
        return apply_activation(h, self.act_name, self.mindone_gelu_formula)

    def construct(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.c_proj(self._act(self.c_fc(self.ln_2(x))))


class _Transformer(nn.Cell):
    def __init__(self, n: int, width: int, inner: int, heads: int, act: str, eps: float):
        super().__init__()
        self.resblocks = nn.CellList([_ResidualBlock(width, inner, heads, act, eps) for _ in range(n)])


class LDMTextEncoder(Recordable):
    """MindONE's LDM ``TextEncoder`` under ``layout.sgm_prefix`` (``cond_stage_model.transformer.``).

    ``enc(input_ids) -> (ln_final(last block), pooled)``: the first is the SD 1.x / 2.x UNet's context.
    Records ``embedding_table`` (token + position embedding), ``transformer_layer.resblocks.i``, ``ln_final``
    and ``pooled`` -- the names :func:`~lora_parity.parity.align.text_alignment` gives the ``ldm`` style.
    """

    def __init__(self, layout: TextEncoderLayout, hidden_act: str | None = None, *,
                 sgm_prefix: str | None = None, layer_norm_eps: float = 1e-5, eos_token_id: int | None = None):
        super().__init__(layout.sgm_prefix if sgm_prefix is None else sgm_prefix)
        self.layout = layout
        self.hidden_act = hidden_act or "quick_gelu"
        self.eos_token_id = eos_token_id
        w = layout.hidden_size
        self.embedding_table = _param((layout.vocab_size, w), "embedding_table")
        self.positional_embedding = _param((layout.max_position_embeddings, w), "positional_embedding")
        self.transformer_layer = _Transformer(layout.num_layers, w, layout.intermediate_size, layout.num_heads,
                                              self.hidden_act, layer_norm_eps)
        self.ln_final = LayerNorm(w, layer_norm_eps)
        self.lora_spelling = LORA_SPELLINGS["ldm"]
        self._finish()

    def construct(self, input_ids):
        ids = input_ids if isinstance(input_ids, Tensor) else Tensor(np.asarray(input_ids), ms.int32)
        length = ids.shape[-1]
        x = ops.gather(self.embedding_table, ids.astype(ms.int32), 0)
        x = x + self.positional_embedding[:length].reshape(1, length, -1).astype(x.dtype)
        mask = causal_mask(length, x.dtype)  # MindONE: np.triu(-inf) in float32, cast to the model dtype
        x = self._rec("embedding_table", x)
        for i, block in enumerate(self.transformer_layer.resblocks):
            x = block(x, mask)
            x = self._rec(f"transformer_layer.resblocks.{i}", x)
        last = self.ln_final(x)
        last = self._rec("ln_final", last)
        pooled = _take_rows(last, _eot_index(ids, self.eos_token_id))
        pooled = self._rec("pooled", pooled)
        return last, pooled


def _eot_index(ids: Tensor, eos_token_id: int | None) -> Tensor:
    """HF ``CLIPTextModel``'s pooling position: the first ``eos_token_id``, or the largest id when the config
    has the legacy ``eos_token_id`` 2 (or none)."""
    if eos_token_id is None or eos_token_id == 2:
        return ops.argmax(ids.astype(ms.int32), -1)
    return ops.argmax((ids.astype(ms.int32) == eos_token_id).astype(ms.int32), -1)


def _take_rows(x: Tensor, idx: Tensor) -> Tensor:
    b = x.shape[0]
    flat = x.reshape(b * x.shape[1], x.shape[2])
    return ops.gather(flat, ops.arange(0, b, dtype=ms.int32) * x.shape[1] + idx.astype(ms.int32), 0)
