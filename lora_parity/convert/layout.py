"""Frozen descriptions of Stable Diffusion architectures (SDXL, SD 1.x, SD 2.x), from which every name map
is generated.

A :class:`UNetLayout` holds just what decides module names and shapes (channels,
blocks, transformer depths); it comes from a preset or from a diffusers
``config.json``.  Text encoders are described by :class:`TextEncoderLayout`.
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


#: Model families the key map knows.  SDXL: SGM names, kohya names the UNet by its SGM names (sd-scripts'
#: SDXL UNet); SD 1.x / 2.x: LDM names (the same UNet naming, text encoder under ``cond_stage_model.``),
#: kohya names the UNet by its diffusers names (sd-scripts' SD 1/2 UNet is diffusers').
FAMILIES = ("sdxl", "sd1", "sd2")


@dataclass(frozen=True)
class ModelLayout:
    """A whole Stable Diffusion model (SDXL, SD 1.x or SD 2.x): UNet plus its text encoders."""

    name: str
    unet: UNetLayout
    text_encoders: tuple[TextEncoderLayout, ...] = field(default_factory=tuple)
    family: str = "sdxl"

    @property
    def kohya_unet_style(self) -> str:
        """How sd-scripts names UNet modules for this family: "sgm" (SDXL) or "diffusers" (SD 1.x / 2.x)."""
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
    """sdxl / sd1 / sd2 from the UNet config (and the pipeline class where there is one).

    SDXL conditions on pooled text + size (``addition_embed_type: text_time``); SD 2.x projects into its
    transformers linearly (``use_linear_projection``, every released 2.x config), SD 1.x with 1x1 convs."""
    cls = (model_index or {}).get("_class_name", "")
    if "XL" in cls or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cls and not cls.startswith("StableDiffusion"):
        raise LoraParityError(f"pipeline {cls} is not a Stable Diffusion UNet pipeline (SD 1.x / 2.x / XL)")
    if unet_cfg.get("addition_embed_type") or unet_cfg.get("class_embed_type"):
        raise LoraParityError("a UNet with extra conditioning (addition/class embedding) that is not SDXL's: "
                              "not an SD 1.x / 2.x / XL model")
    return "sd2" if unet_cfg.get("use_linear_projection") else "sd1"


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


def load_layout(spec: str) -> ModelLayout:
    """A preset name, a diffusers UNet ``config.json``, or a diffusers pipeline folder."""
    if spec in PRESETS:
        return PRESETS[spec]
    if spec == "tiny":  # the built-in test models; never auto-detected
        return tiny_layout()
    if spec in ("tiny-sd1", "tiny-sd2"):
        return tiny_sd_layout(spec.split("-")[1])
    path = Path(spec)
    if path.is_dir():
        return layout_from_pipeline_dir(path)
    if not path.is_file():
        raise LoraParityError(
            f"not a preset ({', '.join(PRESETS)}) nor an existing config.json", path=spec)
    cfg = _read_json(path)
    try:
        family = family_of(cfg)
    except LoraParityError as exc:
        raise LoraParityError(str(exc), path=path) from None
    return ModelLayout(path.parent.name or "custom",
                       UNetLayout.from_diffusers_config(cfg, name=str(path)), family=family)


def layout_from_pipeline_dir(path: Path) -> ModelLayout:
    """A diffusers pipeline folder: ``unet/``, ``text_encoder/`` and, for SDXL, ``text_encoder_2/``."""
    unet_cfg = path / "unet" / "config.json"
    if not unet_cfg.is_file():
        raise LoraParityError("no unet/config.json in this folder", path=path)
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoraParityError(f"cannot read JSON: {exc}", path=path) from None
