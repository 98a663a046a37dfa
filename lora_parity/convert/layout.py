"""Frozen descriptions of Stable Diffusion architectures (SDXL, SD 1.x, SD 2.x, SD3, Flux), from which every
name map is generated.

A :class:`UNetLayout` holds just what decides module names and shapes (channels,
blocks, transformer depths); it comes from a preset or from a diffusers
``config.json``.  SD3 and Flux denoise with a transformer instead: :class:`TransformerLayout`
(read from diffusers' ``transformer/config.json``).  Text encoders (CLIP, and T5 for SD3 / Flux)
are described by :class:`TextEncoderLayout`.
Nothing here knows about LoRA or files: the key map expands these into tables.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_parity.errors import LoraParityError


@dataclass(frozen=True)
class UNetLayout:
    """The SGM ``UNetModel`` / diffusers ``UNet2DConditionModel`` shape-defining numbers."""

    model_channels: int
    channel_mult: tuple[int, ...]
    layers_per_block: int
    # transformer blocks per level on the down path; 0 = level without attention
    transformer_depth: tuple[int, ...]
    # per level on the up path, indexed like ``transformer_depth`` (level, not up-block index)
    transformer_depth_up: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int
    adm_in_channels: int | None
    in_channels: int = 4
    out_channels: int = 4
    # head size used by the MindSpore model (diffusers' SDXL "attention_head_dim" is a head count)
    num_head_channels: int = 64
    norm_num_groups: int = 32
    addition_time_embed_dim: int = 256
    name: str = "custom"
    # SDXL and SD 2.x project into / out of each transformer with a Linear; SD 1.x with a 1x1 Conv
    linear_projection: bool = True

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def level_channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def heads(self, level_or_mid: int | None) -> int:
        ch = self.level_channels(self.levels - 1 if level_or_mid is None else level_or_mid)
        return max(1, ch // self.num_head_channels)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_diffusers_config(cls, cfg: dict, name: str = "custom") -> "UNetLayout":
        """Read a diffusers ``UNet2DConditionModel`` config (SDXL, SD 2.x: linear projections; SD 1.x: conv)."""
        try:
            boc = tuple(int(c) for c in cfg["block_out_channels"])
            mc = boc[0]
            if any(c % mc for c in boc):
                raise LoraParityError(f"block_out_channels {boc} are not multiples of {mc}")
            mult = tuple(c // mc for c in boc)
            levels = len(boc)
            tlpb = cfg.get("transformer_layers_per_block", 1)
            tlpb = [int(tlpb)] * levels if isinstance(tlpb, int) else [int(t) for t in tlpb]
            down_types = cfg["down_block_types"]
            up_types = cfg["up_block_types"]
            depth = tuple(t if "CrossAttn" in bt else 0 for t, bt in zip(tlpb, down_types))
            rtl = cfg.get("reverse_transformer_layers_per_block")
            rev = list(reversed(tlpb)) if rtl is None else [
                (r[0] if isinstance(r, (list, tuple)) else int(r)) for r in rtl
            ]
            up_depth_by_upblock = [t if "CrossAttn" in bt else 0 for t, bt in zip(rev, up_types)]
            depth_up = tuple(reversed(up_depth_by_upblock))
            mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
            mid = tlpb[-1] if mid_type == "UNetMidBlock2DCrossAttn" else 0
            adm = cfg.get("projection_class_embeddings_input_dim")
            heads = cfg.get("attention_head_dim", 8)
            heads = [heads] * levels if isinstance(heads, int) else list(heads)
            head_ch = boc[-1] // heads[-1]
            return cls(
                model_channels=mc,
                channel_mult=mult,
                layers_per_block=int(cfg.get("layers_per_block", 2)),
                transformer_depth=depth,
                transformer_depth_up=depth_up,
                transformer_depth_middle=mid,
                context_dim=int(cfg["cross_attention_dim"]),
                adm_in_channels=None if adm is None else int(adm),
                in_channels=int(cfg.get("in_channels", 4)),
                out_channels=int(cfg.get("out_channels", 4)),
                num_head_channels=head_ch,
                norm_num_groups=int(cfg.get("norm_num_groups", 32)),
                addition_time_embed_dim=int(cfg.get("addition_time_embed_dim") or 256),
                name=name,
                linear_projection=bool(cfg.get("use_linear_projection", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LoraParityError(f"not a diffusers UNet config: {exc!r}") from None


@dataclass(frozen=True)
class TextEncoderLayout:
    """A CLIP text transformer: HF ``CLIPTextModel`` numbers plus where SGM keeps it."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    # "hf": SGM wraps a HF CLIPTextModel (CLIP-L); "openclip": fused in_proj resblocks (bigG);
    # "ldm": MindONE's SD 1.x / 2.x TextEncoder (fused in_proj, other block names; keymap._FUSED_STYLES)
    style: str
    sgm_prefix: str
    diffusers_prefix: str
    kohya_prefix: str
    projection_dim: int | None = None
    num_heads: int = 12
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    # "t5" only: width of the attention projections (heads * d_kv, which T5 need not tie to d_model) and
    # whether the feed-forward is gated (v1.1's wi_0 / wi_1) or a single wi
    attention_dim: int | None = None
    gated_ffn: bool = False


#: Model families the key map knows.  SDXL: SGM names, kohya names the UNet by its SGM names (sd-scripts'
#: SDXL UNet); SD 1.x / 2.x: LDM names (the same UNet naming, text encoder under ``cond_stage_model.``),
#: kohya names the UNet by its diffusers names (sd-scripts' SD 1/2 UNet is diffusers').
#: SD3 / Flux: a diffusers transformer, no MindSpore-only names (mindone.diffusers keeps diffusers' names).
FAMILIES = ("sdxl", "sd1", "sd2", "sd3", "flux")
TRANSFORMER_FAMILIES = ("sd3", "flux")


@dataclass(frozen=True)
class TransformerLayout:
    """The numbers that decide module names and shapes of diffusers' ``SD3Transformer2DModel`` (MMDiT joint
    blocks) and ``FluxTransformer2DModel`` (double-stream blocks named like SD3's, then single-stream blocks).

    SD3's last joint block is ``context_pre_only`` (no text-side output projection or feed-forward); SD3.5
    adds a second image-only attention (``attn2``) in the blocks listed in ``dual_attention_layers``."""

    kind: str  # "sd3" | "flux"
    num_layers: int  # joint (SD3) / double-stream (Flux) blocks
    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    patch_size: int
    joint_attention_dim: int  # width of the T5 states fed to context_embedder
    pooled_projection_dim: int  # width of the pooled CLIP vector fed to the text embedder
    caption_projection_dim: int  # SD3: context_embedder output (= hidden size in released configs)
    num_single_layers: int = 0  # Flux single-stream blocks
    guidance_embeds: bool = False  # FLUX.1-dev: a guidance embedder next to the timestep embedder
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5: joint blocks with a second attention
    mlp_ratio: float = 4.0  # Flux single blocks' proj_mlp width (diffusers' default)
    name: str = "custom"

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def context_pre_only(self, block: int) -> bool:
        """SD3's last joint block only reads the text stream (diffusers: ``i == num_layers - 1``)."""
        return self.kind == "sd3" and block == self.num_layers - 1

    @classmethod
    def from_diffusers_config(cls, cfg: dict, name: str = "custom") -> "TransformerLayout":
        """Read a diffusers ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` config (defaults as diffusers')."""
        kind = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(cfg.get("_class_name", ""))
        if kind is None:
            raise LoraParityError(f"not an SD3 / Flux transformer config (_class_name "
                                  f"{cfg.get('_class_name')!r}; expected SD3Transformer2DModel or FluxTransformer2DModel)")
        try:
            heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
            inner = heads * head_dim
            in_ch = int(cfg.get("in_channels", 16 if kind == "sd3" else 64))
            return cls(
                kind=kind,
                num_layers=int(cfg.get("num_layers", 18 if kind == "sd3" else 19)),
                num_heads=heads,
                head_dim=head_dim,
                in_channels=in_ch,
                out_channels=int(cfg.get("out_channels") or in_ch),
                patch_size=int(cfg.get("patch_size", 2 if kind == "sd3" else 1)),
                joint_attention_dim=int(cfg.get("joint_attention_dim", 4096)),
                pooled_projection_dim=int(cfg.get("pooled_projection_dim", 2048 if kind == "sd3" else 768)),
                caption_projection_dim=int(cfg.get("caption_projection_dim") or inner) if kind == "sd3" else inner,
                num_single_layers=int(cfg.get("num_single_layers", 38)) if kind == "flux" else 0,
                guidance_embeds=bool(cfg.get("guidance_embeds", False)) if kind == "flux" else False,
                dual_attention_layers=tuple(int(i) for i in cfg.get("dual_attention_layers") or ()),
                name=name,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LoraParityError(f"not a diffusers {kind.upper()} transformer config: {exc!r}") from None


@dataclass(frozen=True)
class NoUNet:
    """Stands in a transformer model's ``ModelLayout.unet``: code written for UNet families that reaches for the
    UNet of an SD3 / Flux layout gets one :class:`LoraParityError` line saying why, not an AttributeError on
    None.  Falsy, hashable and comparable, so layouts stay usable as cache keys."""

    family: str
    layout: str

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # copy / pickle probe dunders: ordinary behaviour
            raise AttributeError(attr)
        raise LoraParityError(f"layout '{self.layout}' ({self.family.upper()}) has a diffusers transformer, "
                              f"no UNet: this step needs a UNet model (SDXL, SD 1.x / 2.x); asked for unet.{attr}")


@dataclass(frozen=True)
class ModelLayout:
    """A whole model: UNet (SDXL, SD 1.x / 2.x) or transformer (SD3, Flux) plus its text encoders.

    A transformer layout's ``unet`` is a :class:`NoUNet` (falsy; any attribute raises one clear error line), so
    the many UNet-only paths keep reading ``layout.unet`` unchanged."""

    name: str
    unet: UNetLayout | NoUNet | None
    text_encoders: tuple[TextEncoderLayout, ...] = field(default_factory=tuple)
    family: str = "sdxl"
    transformer: TransformerLayout | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise LoraParityError(f"unknown model family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.family in TRANSFORMER_FAMILIES:
            if self.transformer is None or self.transformer.kind != self.family:
                raise LoraParityError(f"layout '{self.name}': family {self.family} needs its transformer layout")
            if not isinstance(self.unet, NoUNet):
                object.__setattr__(self, "unet", NoUNet(self.family, self.name))
        elif self.unet is None or isinstance(self.unet, NoUNet):
            raise LoraParityError(f"layout '{self.name}': family {self.family} needs a UNet layout")

    @property
    def is_transformer(self) -> bool:
        return self.family in TRANSFORMER_FAMILIES

    @property
    def kohya_unet_style(self) -> str:
        """How sd-scripts names UNet modules for this family: "sgm" (SDXL) or "diffusers" (SD 1.x / 2.x; SD3 and
        Flux have no UNet and name their transformer ``lora_transformer_`` + diffusers path)."""
        return "sgm" if self.family == "sdxl" else "diffusers"


# diffusers configs of the released models (public facts; the tests build these on the meta device)
SDXL_BASE_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_REFINER_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2560,
    "sample_size": 128,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# HF CLIPTextConfig numbers of the released text encoders
CLIP_L_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "projection_dim": 768}
CLIP_BIGG_CONFIG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                    "num_attention_heads": 20, "projection_dim": 1280}


def text_encoder_layout(hf_cfg: dict, *, style: str, sgm_prefix: str, diffusers_prefix: str,
                        kohya_prefix: str) -> TextEncoderLayout:
    return TextEncoderLayout(
        hidden_size=int(hf_cfg["hidden_size"]),
        intermediate_size=int(hf_cfg["intermediate_size"]),
        num_layers=int(hf_cfg["num_hidden_layers"]),
        num_heads=int(hf_cfg.get("num_attention_heads", 12)),
        projection_dim=hf_cfg.get("projection_dim"),
        vocab_size=int(hf_cfg.get("vocab_size", 49408)),
        max_position_embeddings=int(hf_cfg.get("max_position_embeddings", 77)),
        style=style,
        sgm_prefix=sgm_prefix,
        diffusers_prefix=diffusers_prefix,
        kohya_prefix=kohya_prefix,
    )


def sdxl_text_encoders(te1_cfg: dict | None, te2_cfg: dict, *, refiner: bool = False
                       ) -> tuple[TextEncoderLayout, ...]:
    """SDXL base: CLIP-L at embedders.0 and bigG at embedders.1; the refiner has bigG only, at .0."""
    out = []
    if te1_cfg is not None and not refiner:
        out.append(text_encoder_layout(
            te1_cfg, style="hf", sgm_prefix="conditioner.embedders.0.transformer.",
            diffusers_prefix="text_encoder.", kohya_prefix="lora_te1_"))
    idx = 0 if refiner else 1
    out.append(text_encoder_layout(
        te2_cfg, style="openclip", sgm_prefix=f"conditioner.embedders.{idx}.model.",
        diffusers_prefix="text_encoder_2.", kohya_prefix="lora_te2_"))
    return tuple(out)


SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET_CONFIG = {**SD15_UNET_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                    "sample_size": 96, "use_linear_projection": True}
# diffusers' SD 2.x text encoder: OpenCLIP-H without its last block (the pipeline uses the penultimate layer)
CLIP_H_CONFIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                 "num_attention_heads": 16, "projection_dim": 512}


def sd_text_encoder(te_cfg: dict, family: str) -> TextEncoderLayout:
    """The SD 1.x / 2.x text encoder as MindONE's LDM port holds it: its own ``TextEncoder`` cell with fused
    q/k/v (``cond_stage_model.transformer.transformer_layer.resblocks.N.attn.attn.in_proj``) for CLIP-L
    (SD 1.x) and the 23-layer OpenCLIP-H (SD 2.x) alike (MindONE ``examples/stable_diffusion_v2``
    ``tools/model_conversion/ms_names_v1.txt`` / ``_v2.txt``; ``FrozenCLIPEmbedder`` in both configs).  Its
    LoRA (``inject_trainable_lora_to_textencoder``) trains that fused ``in_proj`` and ``out_proj``.
    sd-scripts names either text encoder ``lora_te_``."""
    if family not in ("sd1", "sd2"):
        raise LoraParityError(f"not an SD 1.x / 2.x family: {family!r}")
    return text_encoder_layout(te_cfg, style="ldm", sgm_prefix="cond_stage_model.transformer.",
                               diffusers_prefix="text_encoder.", kohya_prefix="lora_te_")


def family_of(unet_cfg: dict, model_index: dict | None = None) -> str:
    """sdxl / sd1 / sd2 from the UNet config (and the pipeline class where there is one); sd3 / flux when the
    config given is an SD3 / Flux transformer's (see :func:`transformer_family_of`).

    SDXL conditions on pooled text + size (``addition_embed_type: text_time``); SD 2.x projects into its
    transformers linearly (``use_linear_projection``, every released 2.x config), SD 1.x with 1x1 convs."""
    cls = (model_index or {}).get("_class_name", "")
    if unet_cfg.get("_class_name") in TRANSFORMER_CLASSES:  # SD3 / Flux: the config is the transformer's
        return transformer_family_of(unet_cfg, model_index)
    if cls in TRANSFORMER_PIPELINES:
        raise LoraParityError(f"pipeline {cls} has a transformer, not a UNet: give its transformer/config.json "
                              f"(or the pipeline folder)")
    if "XL" in cls or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cls and not cls.startswith("StableDiffusion"):
        raise LoraParityError(f"pipeline {cls} is not a Stable Diffusion UNet pipeline (SD 1.x / 2.x / XL)")
    if unet_cfg.get("addition_embed_type") or unet_cfg.get("class_embed_type"):
        raise LoraParityError("a UNet with extra conditioning (addition/class embedding) that is not SDXL's: "
                              "not an SD 1.x / 2.x / XL model")
    return "sd2" if unet_cfg.get("use_linear_projection") else "sd1"


# diffusers transformer configs of the released SD3 / Flux models and their T5 encoder (public facts; the
# tests build them on the meta device)
SD3_MEDIUM_TRANSFORMER_CONFIG = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
    "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
FLUX_DEV_TRANSFORMER_CONFIG = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
#: transformers ``T5Config`` of T5 v1.1 XXL's encoder (SD3's text_encoder_3, Flux's text_encoder_2)
T5_XXL_CONFIG = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False,
}
#: sd-scripts' / ComfyUI's kohya prefix of each text encoder per transformer family.  ComfyUI's
#: ``model_lora_keys_clip`` numbers T5 after the CLIPs present: ``lora_te3_`` with CLIP-L + CLIP-G (SD3),
#: ``lora_te2_`` with CLIP-L alone (Flux; it also reads ``lora_te3_`` there, see KeyMap.by_kohya).
TRANSFORMER_TE_KOHYA = {"sd3": ("lora_te1_", "lora_te2_", "lora_te3_"), "flux": ("lora_te1_", "lora_te2_")}


def t5_encoder_layout(t5_cfg: dict, *, diffusers_prefix: str, kohya_prefix: str) -> TextEncoderLayout:
    """A transformers ``T5EncoderModel`` (``encoder.block.N.layer.0.SelfAttention.{q,k,v,o}``,
    ``layer.1.DenseReluDense.{wi_0,wi_1,wo}`` for gated v1.1, ``wi`` otherwise; no biases)."""
    try:
        return TextEncoderLayout(
            hidden_size=int(t5_cfg["d_model"]), intermediate_size=int(t5_cfg["d_ff"]),
            num_layers=int(t5_cfg["num_layers"]), style="t5", sgm_prefix=diffusers_prefix,
            diffusers_prefix=diffusers_prefix, kohya_prefix=kohya_prefix, num_heads=int(t5_cfg["num_heads"]),
            vocab_size=int(t5_cfg.get("vocab_size", 32128)), max_position_embeddings=0,
            attention_dim=int(t5_cfg["num_heads"]) * int(t5_cfg["d_kv"]),
            gated_ffn=str(t5_cfg.get("feed_forward_proj", "relu")).startswith("gated-"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LoraParityError(f"not a transformers T5 config: {exc!r}") from None


def transformer_text_encoders(family: str, clip_cfgs: tuple[dict, ...], t5_cfg: dict | None
                              ) -> tuple[TextEncoderLayout, ...]:
    """SD3: CLIP-L ``text_encoder``, CLIP-G ``text_encoder_2``, T5 ``text_encoder_3``; Flux: CLIP-L
    ``text_encoder``, T5 ``text_encoder_2``.  The diffusers names are the MindSpore names too (mindone.diffusers)."""
    prefixes = TRANSFORMER_TE_KOHYA[family]
    out = []
    for i, cfg in enumerate(clip_cfgs):
        comp = "text_encoder." if i == 0 else f"text_encoder_{i + 1}."
        out.append(text_encoder_layout(cfg, style="hf", sgm_prefix=comp, diffusers_prefix=comp,
                                       kohya_prefix=prefixes[i]))
    if t5_cfg is not None:
        n = len(prefixes)
        out.append(t5_encoder_layout(t5_cfg, diffusers_prefix=f"text_encoder_{n}.", kohya_prefix=prefixes[n - 1]))
    return tuple(out)


def transformer_layout(name: str, cfg: dict, clip_cfgs: tuple[dict, ...], t5_cfg: dict | None) -> ModelLayout:
    """An SD3 / Flux :class:`ModelLayout` from its transformer config and text-encoder configs."""
    tr = TransformerLayout.from_diffusers_config(cfg, name=name)
    return ModelLayout(name, None, transformer_text_encoders(tr.kind, clip_cfgs, t5_cfg), family=tr.kind,
                       transformer=tr)


PRESETS: dict[str, ModelLayout] = {
    "sdxl-base": ModelLayout(
        "sdxl-base",
        UNetLayout.from_diffusers_config(SDXL_BASE_UNET_CONFIG, name="sdxl-base"),
        sdxl_text_encoders(CLIP_L_CONFIG, CLIP_BIGG_CONFIG),
    ),
    "sdxl-refiner": ModelLayout(
        "sdxl-refiner",
        UNetLayout.from_diffusers_config(SDXL_REFINER_UNET_CONFIG, name="sdxl-refiner"),
        sdxl_text_encoders(None, CLIP_BIGG_CONFIG, refiner=True),
    ),
    "sd15": ModelLayout("sd15", UNetLayout.from_diffusers_config(SD15_UNET_CONFIG, name="sd15"),
                        (sd_text_encoder(CLIP_L_CONFIG, "sd1"),), family="sd1"),
    "sd21": ModelLayout("sd21", UNetLayout.from_diffusers_config(SD21_UNET_CONFIG, name="sd21"),
                        (sd_text_encoder(CLIP_H_CONFIG, "sd2"),), family="sd2"),
    "sd3": transformer_layout("sd3", SD3_MEDIUM_TRANSFORMER_CONFIG, (CLIP_L_CONFIG, CLIP_BIGG_CONFIG), T5_XXL_CONFIG),
    "flux": transformer_layout("flux", FLUX_DEV_TRANSFORMER_CONFIG, (CLIP_L_CONFIG,), T5_XXL_CONFIG),
}


def tiny_layout() -> ModelLayout:
    """The tiny model's layout (UNet + both text encoders), as the key map sees it."""
    from lora_parity.convert.tiny import TINY_TE1_CONFIG, TINY_TE2_CONFIG, TINY_UNET_CONFIG

    return ModelLayout("tiny", UNetLayout.from_diffusers_config(TINY_UNET_CONFIG, name="tiny"),
                       sdxl_text_encoders(TINY_TE1_CONFIG, TINY_TE2_CONFIG))


def tiny_refiner_layout() -> ModelLayout:
    """The tiny refiner's layout (UNet + the bigG-style encoder at ``conditioner.embedders.0``)."""
    from lora_parity.convert.tiny import TINY_REFINER_UNET_CONFIG, TINY_TE2_CONFIG

    return ModelLayout("tiny-refiner", UNetLayout.from_diffusers_config(TINY_REFINER_UNET_CONFIG,
                                                                        name="tiny-refiner"),
                       sdxl_text_encoders(None, TINY_TE2_CONFIG, refiner=True))


def tiny_sd_layout(family: str) -> ModelLayout:
    """The key-map layout of the tiny SD 1.x (``sd1``) or SD 2.x (``sd2``) model."""
    from lora_parity.convert.tiny import TINY_SD_CONFIGS

    unet, te = TINY_SD_CONFIGS[family]
    return ModelLayout(f"tiny-{family}", UNetLayout.from_diffusers_config(unet, name=f"tiny-{family}"),
                       (sd_text_encoder(te, family),), family=family)


def tiny_transformer_layout(family: str) -> ModelLayout:
    """The key-map layout of the tiny SD3 (``sd3``) or Flux (``flux``) model."""
    from lora_parity.convert import tiny

    if family == "sd3":
        return transformer_layout("tiny-sd3", tiny.TINY_SD3_TRANSFORMER_CONFIG,
                                  (tiny.TINY_SD3_CLIP_CONFIG, tiny.TINY_SD3_CLIP_G_CONFIG), tiny.TINY_T5_CONFIG)
    if family == "flux":
        return transformer_layout("tiny-flux", tiny.TINY_FLUX_TRANSFORMER_CONFIG, (tiny.TINY_TE1_CONFIG,),
                                  tiny.TINY_T5_CONFIG)
    raise LoraParityError(f"not a transformer family: {family!r} (sd3 or flux)")


def load_layout(spec: str) -> ModelLayout:
    """A preset name, a diffusers UNet ``config.json``, or a diffusers pipeline folder."""
    if spec in PRESETS:
        return PRESETS[spec]
    if spec == "tiny":  # the built-in test models; never auto-detected
        return tiny_layout()
    if spec in ("tiny-sd1", "tiny-sd2"):
        return tiny_sd_layout(spec.split("-")[1])
    if spec in ("tiny-sd3", "tiny-flux"):
        return tiny_transformer_layout(spec.split("-")[1])
    path = Path(spec)
    if path.is_dir():
        return layout_from_pipeline_dir(path)
    if not path.is_file():
        raise LoraParityError(
            f"not a preset ({', '.join(PRESETS)}) nor an existing config.json", path=spec)
    cfg = _read_json(path)
    if cfg.get("_class_name") in TRANSFORMER_CLASSES:  # a bare transformer config: no text encoders known
        try:
            return transformer_layout(path.parent.name or "custom", cfg, (), None)
        except LoraParityError as exc:
            raise LoraParityError(str(exc), path=path) from None
    try:
        family = family_of(cfg)
    except LoraParityError as exc:
        raise LoraParityError(str(exc), path=path) from None
    return ModelLayout(path.parent.name or "custom",
                       UNetLayout.from_diffusers_config(cfg, name=str(path)), family=family)


def layout_from_pipeline_dir(path: Path) -> ModelLayout:
    """A diffusers pipeline folder: ``unet/``, ``text_encoder/`` and, for SDXL, ``text_encoder_2/``; SD3 / Flux:
    ``transformer/`` and their text encoders (detected from ``model_index.json`` / the transformer config)."""
    unet_cfg = path / "unet" / "config.json"
    if (path / "transformer" / "config.json").is_file() or _pipeline_class(path) in TRANSFORMER_PIPELINES:
        return _transformer_pipeline_layout(path)
    if not unet_cfg.is_file():
        raise LoraParityError("no unet/config.json (nor transformer/config.json) in this folder", path=path)
    cfg = _read_json(unet_cfg)
    index = path / "model_index.json"
    try:
        family = family_of(cfg, _read_json(index) if index.is_file() else None)
    except LoraParityError as exc:
        raise LoraParityError(str(exc), path=path) from None
    unet = UNetLayout.from_diffusers_config(cfg, name=str(path))
    te1 = path / "text_encoder" / "config.json"
    te2 = path / "text_encoder_2" / "config.json"
    tes: tuple[TextEncoderLayout, ...] = ()
    if family != "sdxl":
        tes = (sd_text_encoder(_read_json(te1), family),) if te1.is_file() else ()
    elif te2.is_file():
        tes = sdxl_text_encoders(_read_json(te1) if te1.is_file() else None, _read_json(te2),
                                 refiner=not te1.is_file())
    return ModelLayout(path.name, unet, tes, family=family)


#: diffusers class names of the transformer families: pipeline (model_index.json) and model (config.json)
TRANSFORMER_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def _pipeline_class(path: Path) -> str:
    index = path / "model_index.json"
    return str(_read_json(index).get("_class_name", "")) if index.is_file() else ""


def transformer_family_of(transformer_cfg: dict, model_index: dict | None = None, *, where: Path | None = None) -> str:
    """sd3 / flux from ``transformer/config.json``'s ``_class_name``, checked against the pipeline class."""
    cls = str(transformer_cfg.get("_class_name", ""))
    family = TRANSFORMER_CLASSES.get(cls)
    if family is None:
        raise LoraParityError(f"transformer/config.json has _class_name {cls!r}; known: "
                              f"{', '.join(TRANSFORMER_CLASSES)}", path=where)
    pipe = str((model_index or {}).get("_class_name", ""))
    if pipe and TRANSFORMER_PIPELINES.get(pipe) != family:
        raise LoraParityError(f"model_index.json's pipeline {pipe!r} does not go with a {cls} (expected "
                              f"{'StableDiffusion3Pipeline' if family == 'sd3' else 'FluxPipeline'})", path=where)
    return family


def _transformer_pipeline_layout(path: Path) -> ModelLayout:
    """An SD3 / Flux pipeline folder: the transformer config and whichever text encoders are there."""
    tcfg_path = path / "transformer" / "config.json"
    if not tcfg_path.is_file():
        raise LoraParityError(f"model_index.json names {_pipeline_class(path)} but there is no "
                              f"transformer/config.json", path=path)
    index = path / "model_index.json"
    family = transformer_family_of(_read_json(tcfg_path), _read_json(index) if index.is_file() else None,
                                   where=tcfg_path)
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"][:len(TRANSFORMER_TE_KOHYA[family])]
    cfgs = [(path / n / "config.json") for n in names]
    clips = tuple(_read_json(c) for c in cfgs[:-1] if c.is_file())
    if len(clips) not in (0, len(cfgs) - 1):
        raise LoraParityError(f"{family.upper()} pipeline with {len(clips)} of its {len(cfgs) - 1} CLIP text "
                              f"encoder configs", path=path)
    t5 = _read_json(cfgs[-1]) if cfgs[-1].is_file() else None
    try:
        return transformer_layout(path.name, _read_json(tcfg_path), clips, t5)
    except LoraParityError as exc:
        raise LoraParityError(str(exc), path=tcfg_path) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoraParityError(f"cannot read JSON: {exc}", path=path) from None
