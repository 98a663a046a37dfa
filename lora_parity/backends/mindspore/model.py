"""Whole-model helpers: build every SDXL component from a layout, SGM conditioning, name/shape lists."""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import Tensor, ops

from ...layout import ModelLayout, TextEncoderLayout
from .layers import Recordable
from .text import build_text_encoder
from .unet import UNetModel, sdxl_vector
from .vae import VAEDecoder

# diffusers AutoencoderKL config of the released SDXL VAE (public facts)
SDXL_VAE_CONFIG = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "norm_num_groups": 32,
    "scaling_factor": 0.13025,
}


@dataclass
class SDXLComponents:
    unet: UNetModel
    text_encoders: tuple[Recordable, ...]
    vae: VAEDecoder | None

    def cells(self) -> list[Recordable]:
        return [self.unet, *self.text_encoders, *([self.vae] if self.vae is not None else [])]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: tuple(p.shape) for c in self.cells() for p in c.get_parameters()}

    def load(self, params: dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Load a name -> Parameter dict (e.g. ``mindspore.load_checkpoint``) into every component.

        Returns (net params not loaded, checkpoint params not used); with ``strict`` either being
        non-empty raises ``ValueError``.
        """
        missing: list[str] = []
        used: set[str] = set()
        for cell in self.cells():
            names = {p.name for p in cell.get_parameters()}
            sub = {k: v for k, v in params.items() if k in names}
            used.update(sub)
            not_loaded, _ = ms.load_param_into_net(cell, sub, strict_load=True)
            missing.extend(not_loaded)
        unused = sorted(set(params) - used)
        if strict and (missing or unused):
            raise ValueError(f"checkpoint mismatch: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unused)} unexpected (e.g. {unused[:3]})")
        return missing, unused

    def conditioning(self, ids_per_encoder, original_size, crop_coords_top_left, target_size
                     ) -> tuple[Tensor, Tensor]:
        """SGM conditioner: ``context`` = penultimate states concatenated on features; ``y`` vector
        = [pooled projected output of the last (OpenCLIP) encoder, size/crop/target sinusoids]."""
        hidden, pooled = [], None
        for enc, ids in zip(self.text_encoders, ids_per_encoder):
            h, p = enc(ids)
            hidden.append(h)
            pooled = p
        context = ops.concat(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
        y = sdxl_vector(pooled, original_size, crop_coords_top_left, target_size,
                        self.unet.layout.addition_time_embed_dim)
        return context, y


def build_sdxl(layout: ModelLayout, te_configs: tuple[dict | None, ...] | None = None,
               vae_config: dict | None = SDXL_VAE_CONFIG) -> SDXLComponents:
    """Every component for ``layout`` (weights lazily zero: load a checkpoint next).

    ``te_configs``: HF ``CLIPTextConfig`` dicts per text encoder (for ``hidden_act`` and
    ``layer_norm_eps``; None -> quick_gelu for CLIP-L, gelu for bigG).  ``vae_config``: a
    diffusers ``AutoencoderKL`` config, or None for no VAE.
    """
    te_configs = te_configs or (None,) * len(layout.text_encoders)
    encoders = tuple(build_text_encoder(te, cfg) for te, cfg in zip(layout.text_encoders, te_configs))
    vae = VAEDecoder.from_diffusers_config(vae_config) if vae_config is not None else None
    return SDXLComponents(UNetModel(layout.unet), encoders, vae)


def param_shapes(layout: ModelLayout | TextEncoderLayout, **kwargs) -> dict[str, tuple[int, ...]]:
    """SGM name -> shape of every parameter the cells for ``layout`` hold.

    Built by the very cells that run (weights are lazy, nothing is allocated: the full
    SDXL base instantiates in about a second).
    """
    if isinstance(layout, TextEncoderLayout):
        return {p.name: tuple(p.shape) for p in build_text_encoder(layout, **kwargs).get_parameters()}
    return build_sdxl(layout, **kwargs).param_shapes()
