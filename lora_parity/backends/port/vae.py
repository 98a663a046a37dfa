"""The SDXL VAE decoder in MindSpore cells, in the SGM / ldm ``first_stage_model`` layout.

Names: ``post_quant_conv``, ``decoder.conv_in``, ``decoder.mid.{block_1, attn_1, block_2}``,
``decoder.up.b.{block.i, upsample.conv}``, ``decoder.norm_out``, ``decoder.conv_out``.
``decoder.up`` is indexed by resolution level (0 = full resolution), i.e. in REVERSED
order relative to diffusers ``decoder.up_blocks``; it is run from the last level down.
ResnetBlocks have ``norm1, conv1, norm2, conv2`` (+ ``nin_shortcut``); ``attn_1`` has
``norm, q, k, v, proj_out`` as 1x1 convolutions.  GroupNorm eps is 1e-6 throughout.

:mod:`.numerics` (MindONE's ``gm`` by default): ``gm`` decodes ``1.0 / scale_factor * z`` and its
attention divides the scores by sqrt(C) (softmax in the input dtype); diffusers divides the
latents by the scaling factor and scales the scores by 1/sqrt(C) (the ``"diffusers"`` mode).
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Tensor, nn, ops

from lora_parity.backends.port import numerics as _nx
from lora_parity.backends.port.layers import GroupNorm, Recordable, Upsample, make_conv

SGM_VAE_PREFIX = "first_stage_model."


def _silu(x):
    return x * ops.sigmoid(x)


class ResnetBlock(nn.Cell):
    def __init__(self, cin: int, cout: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps)
        self.conv1 = make_conv(cin, cout, 3)
        self.norm2 = GroupNorm(groups, cout, eps)
        self.conv2 = make_conv(cout, cout, 3)
        self.has_shortcut = cin != cout
        if self.has_shortcut:
            self.nin_shortcut = make_conv(cin, cout, 1)

    def construct(self, x):
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        if self.has_shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over H*W with 1x1-conv projections, scale 1/sqrt(C)."""

    NUMERICS_POINTS = ("attention_scale", "compute_dtype")

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        _nx.stamp(self, self.NUMERICS_POINTS)
        self.norm = GroupNorm(groups, channels, eps)
        self.q = make_conv(channels, channels, 1)
        self.k = make_conv(channels, channels, 1)
        self.v = make_conv(channels, channels, 1)
        self.proj_out = make_conv(channels, channels, 1)

    def construct(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = self.q(hn).reshape(b, c, h * w).transpose(0, 2, 1)   # (B, HW, C)
        k = self.k(hn).reshape(b, c, h * w)                      # (B, C, HW)
        v = self.v(hn).reshape(b, c, h * w).transpose(0, 2, 1)   # (B, HW, C)
        scores = ops.matmul(q, k)
        if self.mindone_attention_scale:
            scores = scores / (c ** 0.5)  # gm: scaled_dot_product_attention
        else:
            scores = scores * (1.0 / math.sqrt(c))
        if self.mindone_compute_dtype:
            probs = ops.softmax(scores, axis=-1).astype(v.dtype)
        else:
            probs = ops.softmax(scores.astype(ms.float32), axis=-1).astype(v.dtype)
        out = ops.matmul(probs, v).transpose(0, 2, 1).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Mid(nn.Cell):
    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, eps)
        self.attn_1 = AttnBlock(ch, groups, eps)
        self.block_2 = ResnetBlock(ch, ch, groups, eps)


class _UpLevel(nn.Cell):
    def __init__(self, blocks: list[nn.Cell], upsample: nn.Cell | None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.has_upsample = upsample is not None
        if upsample is not None:
            self.upsample = upsample


class Decoder(nn.Cell):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 out_ch: int, groups: int, eps: float):
        super().__init__()
        levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = make_conv(z_channels, block_in, 3)
        self.mid = _Mid(block_in, groups, eps)
        ups: list[nn.Cell] = [None] * levels  # type: ignore[list-item]
        for level in reversed(range(levels)):
            block_out = ch * ch_mult[level]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, groups, eps))
                block_in = block_out
            ups[level] = _UpLevel(blocks, Upsample(block_in) if level != 0 else None)
        self.up = nn.CellList(ups)
        self.norm_out = GroupNorm(groups, block_in, eps)
        self.conv_out = make_conv(block_in, out_ch, 3)


class VAEDecoder(Recordable):
    """``first_stage_model`` decode path: ``decode(z) = decoder(post_quant_conv(z / scale_factor))``.

    Numbers as in a diffusers ``AutoencoderKL`` config: ``block_out_channels`` (ch * ch_mult),
    ``layers_per_block`` (num_res_blocks), ``latent_channels``, ``out_channels``,
    ``norm_num_groups``, ``scaling_factor``.  Use :meth:`from_diffusers_config`.

    ``vae(z)`` applies the scale factor (pass ``scaled=False`` to skip it).  Records
    ``post_quant_conv``, ``decoder.conv_in``, ``decoder.mid.block_1``, ``decoder.mid.attn_1``,
    ``decoder.mid.block_2``, ``decoder.up.L`` (after its upsample), ``decoder.norm_out``
    (after SiLU) and ``decoder.conv_out``.
    """

    NUMERICS_POINTS = ("vae_latent_scale",)

    def __init__(self, block_out_channels, layers_per_block: int = 2, latent_channels: int = 4,
                 out_channels: int = 3, norm_num_groups: int = 32, scaling_factor: float = 0.13025,
                 *, eps: float = 1e-6, sgm_prefix: str = SGM_VAE_PREFIX):
        super().__init__(sgm_prefix)
        _nx.stamp(self, self.NUMERICS_POINTS)
        boc = [int(c) for c in block_out_channels]
        ch = boc[0]
        if any(c % ch for c in boc):
            raise ValueError(f"block_out_channels {boc} are not multiples of {ch}")
        self.ch_mult = tuple(c // ch for c in boc)
        self.scaling_factor = float(scaling_factor)
        # gm's decode_first_stage: ``1.0 / self.scale_factor * z`` -- the reciprocal taken in Python
        # (float64), then one float32 multiplication (taken here so graph mode folds the same constant)
        self.inv_scaling_factor = 1.0 / self.scaling_factor
        self.post_quant_conv = make_conv(latent_channels, latent_channels, 1)
        self.decoder = Decoder(ch, self.ch_mult, int(layers_per_block), latent_channels, out_channels,
                               int(norm_num_groups), eps)
        self._finish()

    @classmethod
    def from_diffusers_config(cls, cfg: dict, **kwargs) -> "VAEDecoder":
        return cls(cfg.get("block_out_channels", (128, 256, 512, 512)),
                   int(cfg.get("layers_per_block", 2)), int(cfg.get("latent_channels", 4)),
                   int(cfg.get("out_channels", 3)), int(cfg.get("norm_num_groups", 32)),
                   float(cfg.get("scaling_factor", 0.13025)), **kwargs)

    def construct(self, z: Tensor, scaled: bool = True) -> Tensor:
        if scaled:
            if self.mindone_vae_latent_scale:
                z = self.inv_scaling_factor * z  # gm's DiffusionEngine.decode_first_stage
            else:
                z = z / self.scaling_factor
        h = self.post_quant_conv(z)
        h = self._rec("post_quant_conv", h)
        dec = self.decoder
        h = dec.conv_in(h)
        h = self._rec("decoder.conv_in", h)
        h = dec.mid.block_1(h)
        h = self._rec("decoder.mid.block_1", h)
        h = dec.mid.attn_1(h)
        h = self._rec("decoder.mid.attn_1", h)
        h = dec.mid.block_2(h)
        h = self._rec("decoder.mid.block_2", h)
        for level in reversed(range(len(self.ch_mult))):
            up = dec.up[level]
            for block in up.block:
                h = block(h)
            if up.has_upsample:
                h = up.upsample(h)
            h = self._rec(f"decoder.up.{level}", h)
        h = _silu(dec.norm_out(h))
        h = self._rec("decoder.norm_out", h)
        h = dec.conv_out(h)
        h = self._rec("decoder.conv_out", h)
        return h
