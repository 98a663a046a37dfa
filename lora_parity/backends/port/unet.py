"""The SDXL UNet in MindSpore cells, in the SGM ``UNetModel`` parameter layout.

Names match ``model.diffusion_model.*`` of an SGM / MindONE checkpoint:
``time_embed.{0,2}``, ``label_emb.0.{0,2}``, ``input_blocks.N.k``, ``middle_block.k``,
``output_blocks.N.k``, ``out.{0,2}``; ResBlocks ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``; SpatialTransformers ``norm``, ``proj_in``,
``transformer_blocks.t.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}``, ``proj_out``.

Numerics follow SGM (which diffusers reproduces): sinusoidal timestep embedding
with cos first, ``emb = time_embed(t_emb) + label_emb(y)``, GroupNorm eps 1e-5 in
ResBlocks and ``out`` and 1e-6 in SpatialTransformer ``norm``, LayerNorm eps 1e-5,
attention scale 1/sqrt(head_dim), GEGLU with erf GELU, output blocks concatenating
``[h, skip]`` on channels.  Where MindONE's ``gm`` and diffusers compute these differently
(timestep frequencies from MindSpore's Exp, ``ops.gelu``, scores divided by sqrt(d), ...),
:mod:`.numerics` selects which (MindONE's by default).
"""
from __future__ import annotations

import math

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from lora_parity.convert.layout import UNetLayout
from lora_parity.backends.port import numerics as _nx
from lora_parity.backends.port.layers import (LORA_SPELLINGS, GroupNorm, Identity, LayerNorm, Linear, Recordable, SiLU, attention, gelu,
                     Upsample, make_conv)

SGM_UNET_PREFIX = "model.diffusion_model."


# --------------------------------------------------------------------------- timestep embeddings

def timestep_frequencies(half: int, max_period: float = 10000.0, exact: bool = True) -> Tensor:
    """The ``half`` sinusoid frequencies ``exp(-ln(P) * i / half)`` (float32).

    ``exact``: the exponent in float32 as SGM / diffusers form it (``float32(-ln P) * i / half``),
    exp in float64 rounded once -- what torch's float32 exp gives.  Otherwise MindONE's ``gm``
    formula with MindSpore ops, ``ops.exp(-ops.log(ones(1) * P) * ops.arange(half) / half)``:
    MindSpore 2.10's CPU Exp is up to ~50 ulp off, which moves sin/cos of t*f (t ~ 1000) by up to ~2e-3.
    """
    if exact:
        exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
        return Tensor(np.exp(exponent.astype(np.float64)).astype(np.float32))
    return ops.exp(-ops.log(ops.ones(1, dtype=ms.float32) * max_period)
                   * ops.arange(start=0, end=half, dtype=ms.float32) / half)


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0, exact_freqs: bool | None = None) -> Tensor:
    """SGM's sinusoidal embedding: ``[cos(t f), sin(t f)]``, ``f_i = exp(-ln(P) i / (dim/2))``.

    The same function as diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)``, in float32.  ``exact_freqs``: see :func:`timestep_frequencies`;
    None follows the ``timestep_freqs`` numerics point (MindONE's ``ops.exp`` by default).
    """
    if exact_freqs is None:
        exact_freqs = not _nx.uses("timestep_freqs")
    if not isinstance(timesteps, Tensor):
        timesteps = Tensor(np.asarray(timesteps, dtype=np.float32).reshape(-1))
    half = dim // 2
    freqs = timestep_frequencies(half, max_period, exact_freqs)
    args = timesteps.reshape(-1, 1).astype(ms.float32) * freqs.reshape(1, -1)
    emb = ops.concat((ops.cos(args), ops.sin(args)), axis=-1)
    if dim % 2:
        emb = ops.concat((emb, ops.zeros_like(emb[:, :1])), axis=-1)
    return emb


class ConcatTimestepEmbedderND(nn.Cell):
    """SGM ``conditioner.embedders.{2,3,4}``: (B, N) numbers -> (B, N*outdim) sinusoids; no params."""

    NUMERICS_POINTS = ("timestep_freqs",)

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = int(outdim)
        _nx.stamp(self, self.NUMERICS_POINTS)

    def construct(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            x = Tensor(np.asarray(x, dtype=np.float32))
        if x.ndim == 1:
            x = x.reshape(-1, 1)
        b = x.shape[0]
        emb = timestep_embedding(x.reshape(-1), self.outdim, 10000.0, not self.mindone_timestep_freqs)
        return emb.reshape(b, -1)


# SDXL's y vector ends in the sinusoids of this many numbers: base = original size (h, w), crop
# (top, left), target size (h, w); refiner = original size, crop, aesthetic score
BASE_TIME_IDS = 6
REFINER_TIME_IDS = 5


def time_id_count(adm_in_channels: int, pooled_dim: int, addition_time_embed_dim: int) -> int:
    """How many numbers the UNet's ``label_emb`` expects after the pooled text embedding.

    ``(adm_in_channels - pooled_dim) / addition_time_embed_dim``: 6 for SDXL base (2816 =
    1280 + 6 * 256), 5 for the refiner (2560 = 1280 + 5 * 256, the aesthetic score instead of
    the target size).  Anything else is not an SDXL layout and raises ``ValueError``.
    """
    rest = int(adm_in_channels) - int(pooled_dim)
    n, rem = divmod(rest, int(addition_time_embed_dim))
    if rem or n not in (BASE_TIME_IDS, REFINER_TIME_IDS):
        raise ValueError(
            f"adm_in_channels {adm_in_channels} = pooled {pooled_dim} + {rest}: not {BASE_TIME_IDS} (SDXL base) "
            f"or {REFINER_TIME_IDS} (SDXL refiner) numbers of {addition_time_embed_dim} sinusoids")
    return n


def _as_rows(value, b: int, width: int, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.astype(ms.float32).reshape(-1, width)
    arr = np.asarray(value, dtype=np.float32).reshape(-1, width)
    if arr.shape[0] not in (1, b):
        raise ValueError(f"{what}: {arr.shape[0]} rows for a batch of {b}")
    return Tensor(np.broadcast_to(arr, (b, width)).copy())


def sdxl_vector(pooled: Tensor, original_size, crop_coords_top_left, target_size, dim: int, *,
                aesthetic_score: float | None = None, adm_in_channels: int | None = None) -> Tensor:
    """The SDXL ``y`` vector: ``[pooled TE2 output, emb(orig h,w), emb(crop top,left), emb(target h,w)]``.

    ``original_size`` etc. are (B, 2) arrays/tensors (or a single pair, broadcast over
    the batch); ``dim`` is ``UNetLayout.addition_time_embed_dim``.  Same values as
    diffusers' ``text_embeds`` + ``time_ids`` path.

    The refiner (SGM ``aesthetic_score`` embedder, diffusers ``requires_aesthetics_score``)
    replaces the target size by one number: ``y = [pooled, emb(orig), emb(crop), emb(score)]``
    (diffusers' ``original_size + crops_coords_top_left + (aesthetic_score,)``).  Which one
    the UNet wants follows from ``adm_in_channels`` (see :func:`time_id_count`); pass it so a
    score given to a base UNet, or missing for a refiner, is an error here rather than a shape
    error (or a silently wrong vector) later.  Without it, ``aesthetic_score`` decides.
    ``aesthetic_score`` may be a float or a (B,) array; ``target_size`` is ignored (may be None)
    for the refiner.
    """
    b = pooled.shape[0]
    if adm_in_channels is not None:
        refiner = time_id_count(adm_in_channels, pooled.shape[-1], dim) == REFINER_TIME_IDS
        if refiner and aesthetic_score is None:
            raise ValueError("this UNet is conditioned on an aesthetic score (SDXL refiner layout, "
                             f"adm_in_channels {adm_in_channels}): pass aesthetic_score")
        if not refiner and aesthetic_score is not None:
            raise ValueError("this UNet has no aesthetic-score conditioning (SDXL base layout, "
                             f"adm_in_channels {adm_in_channels}): it takes target_size instead")
    else:
        refiner = aesthetic_score is not None
    parts = [pooled.astype(ms.float32)]
    emb = ConcatTimestepEmbedderND(dim)
    parts.append(emb(_as_rows(original_size, b, 2, "original_size")))
    parts.append(emb(_as_rows(crop_coords_top_left, b, 2, "crop_coords_top_left")))
    if refiner:
        parts.append(emb(_as_rows(aesthetic_score, b, 1, "aesthetic_score")))
    else:
        if target_size is None:
            raise ValueError("target_size is required for an SDXL base UNet")
        parts.append(emb(_as_rows(target_size, b, 2, "target_size")))
    return ops.concat(parts, axis=-1)


# --------------------------------------------------------------------------- blocks

class EmbedSequential(nn.Cell):
    """SGM ``TimestepEmbedSequential``: children named ``0``, ``1``, ... called by type."""

    def __init__(self, layers: list[nn.Cell]):
        super().__init__()
        self.n = len(layers)
        for i, layer in enumerate(layers):
            self.insert_child_to_cell(str(i), layer)
        # a plain list attribute (as nn.SequentialCell keeps): graph mode iterates it unrolled
        self.cell_list = list(layers)

    def layers(self) -> list[nn.Cell]:
        return [self._cells[str(i)] for i in range(self.n)]

    def construct(self, x, emb, context):
        for layer in self.cell_list:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Cell):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.in_layers = nn.SequentialCell([GroupNorm(groups, channels, eps), SiLU(),
                                            make_conv(channels, out_channels, 3)])
        self.emb_layers = nn.SequentialCell([SiLU(), Linear(emb_channels, out_channels)])
        self.out_layers = nn.SequentialCell([GroupNorm(groups, out_channels, eps), SiLU(), Identity(),
                                             make_conv(out_channels, out_channels, 3)])
        self.skip_connection = (Identity() if channels == out_channels
                                else make_conv(channels, out_channels, 1))

    def construct(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb).astype(h.dtype)
        h = h + e.reshape(e.shape + (1, 1))
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.op = make_conv(channels, channels, 3, stride=2, padding=1)

    def construct(self, x):
        return self.op(x)


class CrossAttention(nn.Cell):
    """``ldm``: MindONE's SD 1.x / 2.x ``Attention`` multiplies the scores by ``dim_head ** -0.5`` (``gm``
    divides by ``sqrt(d)``), so the ``attention_scale`` point has nothing to change there."""

    NUMERICS_POINTS = ("attention_scale", "compute_dtype")

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, ldm: bool = False):
        super().__init__()
        _nx.stamp(self, self.NUMERICS_POINTS)
        self.ldm = bool(ldm)
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.SequentialCell([Linear(inner, query_dim), Identity()])

    def construct(self, x, context=None):
        ctx = x if context is None else context
        # gm: scaled_dot_product_attention, softmax(q @ k^T / sqrt(d)) in the input dtype
        scale = "div" if self.mindone_attention_scale and not self.ldm else "mul"
        out = attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads, None, scale,
                        not self.mindone_compute_dtype)
        return self.to_out(out)


class GEGLU(nn.Cell):
    NUMERICS_POINTS = ("gelu_formula",)

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)
        self.dim_out = dim_out
        _nx.stamp(self, self.NUMERICS_POINTS)

    def construct(self, x):
        h = self.proj(x)
        a = h[..., : self.dim_out]
        gate = h[..., self.dim_out:]
        return a * gelu(gate, self.mindone_gelu_formula)


class FeedForward(nn.Cell):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner), Identity(), Linear(inner, dim)])

    def construct(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Cell):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, ln_eps: float = 1e-5,
                 ldm: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, ldm)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, ldm)
        self.norm1 = LayerNorm(dim, ln_eps)
        self.norm2 = LayerNorm(dim, ln_eps)
        self.norm3 = LayerNorm(dim, ln_eps)

    def construct(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Cell):
    """SGM / LDM ``SpatialTransformer``: ``linear`` (SDXL, SD 2.x: ``use_linear``) projects tokens with a
    Dense; otherwise (SD 1.x) ``proj_in`` / ``proj_out`` are 1x1 convolutions on the image, before the
    flattening and after the unflattening, as LDM orders them."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 groups: int, norm_eps: float = 1e-6, ln_eps: float = 1e-5, *, linear: bool = True,
                 ldm: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.linear = bool(linear)
        self.norm = GroupNorm(groups, channels, norm_eps)
        self.proj_in = Linear(channels, inner) if linear else make_conv(channels, inner, 1, padding=0)
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim, ln_eps, ldm) for _ in range(depth)])
        self.proj_out = Linear(inner, channels) if linear else make_conv(inner, channels, 1, padding=0)

    def construct(self, x, context):
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        inner = x.shape[1]
        x = x.reshape(b, inner, h * w).transpose(0, 2, 1)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.transpose(0, 2, 1).reshape(b, x.shape[-1], h, w)
        if not self.linear:
            x = self.proj_out(x)
        return x + x_in


# --------------------------------------------------------------------------- the UNet

class UNetModel(Recordable):
    """SGM ``UNetModel`` built from a :class:`~lora_parity.convert.layout.UNetLayout`: SDXL, or with
    ``family`` "sd1" / "sd2" MindONE's LDM ``UNetModel`` (``examples/stable_diffusion_v2``: no ``label_emb``,
    ``y`` None) -- the same blocks and names, differing where LDM's configs and code do: SD 1.x has a fixed
    head count at every level (``num_heads: 8``; diffusers' ``attention_head_dim`` 8, i.e. the layout's
    last-level channels / ``num_head_channels``) and 1x1-conv projections; SD 2.x has ``num_head_channels: 64``
    and linear projections (``layout.linear_projection``); LDM's attention multiplies the scores by the scale.

    ``unet(x, timesteps, context, y)``: x (B, C, H, W) latents, timesteps (B,),
    context (B, L, context_dim) = concatenated TE penultimate states, y (B, adm_in_channels)
    from :func:`sdxl_vector`.  With :func:`~.layers.capture_activations` it records
    ``time_embed``, ``label_emb``, ``input_blocks.i``, ``middle_block``, ``output_blocks.i``
    and ``out`` (prefixed with ``sgm_prefix``).
    """

    NUMERICS_POINTS = ("timestep_freqs",)

    def __init__(self, layout: UNetLayout, sgm_prefix: str = SGM_UNET_PREFIX, *,
                 resblock_eps: float = 1e-5, transformer_norm_eps: float = 1e-6,
                 layer_norm_eps: float = 1e-5, family: str = "sdxl"):
        super().__init__(sgm_prefix)
        if family not in ("sdxl", "sd1", "sd2"):
            raise ValueError(f"the port's UNet runs SDXL, SD 1.x and SD 2.x, not {family!r}")
        if family != "sdxl" and layout.adm_in_channels is not None:
            raise ValueError(f"an {family} UNet has no label_emb (adm_in_channels {layout.adm_in_channels})")
        self.layout = layout
        self.family = family
        _nx.stamp(self, self.NUMERICS_POINTS)
        mc = layout.model_channels
        ted = layout.time_embed_dim
        groups = layout.norm_num_groups
        nhc = layout.num_head_channels
        nrb = layout.layers_per_block

        fixed_heads = layout.heads(None) if family == "sd1" else None  # LDM v1: num_heads, not head size

        def st(ch: int, depth: int) -> SpatialTransformer:
            heads = fixed_heads or max(1, ch // nhc)
            return SpatialTransformer(ch, heads, ch // heads, depth, layout.context_dim, groups,
                                      transformer_norm_eps, layer_norm_eps, linear=layout.linear_projection or family == "sdxl",
                                      ldm=family != "sdxl")

        def rb(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, ted, cout, groups, resblock_eps)

        self.time_embed = nn.SequentialCell([Linear(mc, ted), SiLU(), Linear(ted, ted)])
        self.has_label_emb = layout.adm_in_channels is not None
        if self.has_label_emb:
            self.label_emb = nn.SequentialCell([nn.SequentialCell(
                [Linear(layout.adm_in_channels, ted), SiLU(), Linear(ted, ted)])])

        blocks = [EmbedSequential([make_conv(layout.in_channels, mc, 3)])]
        chans = [mc]
        ch = mc
        for level, mult in enumerate(layout.channel_mult):
            for _ in range(nrb):
                layers: list[nn.Cell] = [rb(ch, mult * mc)]
                ch = mult * mc
                if layout.transformer_depth[level] > 0:
                    layers.append(st(ch, layout.transformer_depth[level]))
                blocks.append(EmbedSequential(layers))
                chans.append(ch)
            if level != layout.levels - 1:
                blocks.append(EmbedSequential([Downsample(ch)]))
                chans.append(ch)
        self.input_blocks = nn.CellList(blocks)

        mid: list[nn.Cell] = [rb(ch, ch)]
        if layout.transformer_depth_middle > 0:
            mid.append(st(ch, layout.transformer_depth_middle))
        mid.append(rb(ch, ch))
        self.middle_block = EmbedSequential(mid)

        blocks = []
        for level, mult in reversed(list(enumerate(layout.channel_mult))):
            for i in range(nrb + 1):
                ich = chans.pop()
                layers = [rb(ch + ich, mc * mult)]
                ch = mc * mult
                if layout.transformer_depth_up[level] > 0:
                    layers.append(st(ch, layout.transformer_depth_up[level]))
                if level and i == nrb:
                    layers.append(Upsample(ch))
                blocks.append(EmbedSequential(layers))
        self.output_blocks = nn.CellList(blocks)
        self.out = nn.SequentialCell([GroupNorm(groups, ch, resblock_eps), SiLU(),
                                      make_conv(mc, layout.out_channels, 3)])
        if family != "sdxl":
            self.lora_spelling = LORA_SPELLINGS["ldm"]
        self._finish()

    def construct(self, x, timesteps, context, y=None):
        t_emb = timestep_embedding(timesteps, self.layout.model_channels, 10000.0,
                                   not self.mindone_timestep_freqs).astype(x.dtype)
        emb = self.time_embed(t_emb)
        emb = self._rec("time_embed", emb)
        if self.has_label_emb:
            if y is None:
                raise ValueError("this UNet has label_emb: pass the SDXL vector y")
            lab = self.label_emb(y.astype(x.dtype))
            lab = self._rec("label_emb", lab)
            emb = emb + lab
        hs = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            h = self._rec(f"input_blocks.{i}", h)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        h = self._rec("middle_block", h)
        for i, block in enumerate(self.output_blocks):
            h = ops.concat((h, hs[len(hs) - 1 - i]), axis=1)  # no list.pop: graph mode
            h = block(h, emb, context)
            h = self._rec(f"output_blocks.{i}", h)
        out = self.out(h)
        out = self._rec("out", out)
        return out
