"""Full-model weight conversion diffusers <-> SGM (MindONE) for UNet, both text encoders and VAE.

Built on the key map's module walk: every Linear/Conv/Norm entry yields its
parameters, and a few exact rules cover what is not a plain copy
(MindSpore norms are ``gamma``/``beta``, embeddings ``embedding_table``;
OpenCLIP's fused ``in_proj`` is q/k/v concatenated; ``text_projection`` is
transposed; the VAE's attention is 1x1 convs in SGM and Linear in diffusers;
the VAE decoder's blocks run in reversed order).  Every rule is a reshape,
transpose, concatenation or split, so both directions are bitwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from lora_parity.errors import KeyMapError, LoraParityError
from lora_parity.convert.keymap import ModuleEntry, keymap_for
from lora_parity.convert.layout import ModelLayout

VAE_SGM = "first_stage_model."
VAE_DIFFUSERS = "vae."
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # OpenCLIP's init; SGM keeps it, diffusers has no such parameter


@dataclass(frozen=True)
class ParamMap:
    """One SGM parameter and the diffusers parameter(s) it is made of."""

    sgm: str
    diffusers: tuple[str, ...]
    rule: str = "copy"  # copy | transpose | conv_linear (SGM 1x1 conv <-> Linear) | concat (fused q/k/v)


@dataclass(frozen=True)
class VaeLayout:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping) -> "VaeLayout":
        return cls(tuple(int(c) for c in cfg["block_out_channels"]), int(cfg.get("layers_per_block", 2)),
                   int(cfg.get("latent_channels", 4)), int(cfg.get("in_channels", 3)),
                   int(cfg.get("out_channels", 3)))


def _module_params(e: ModuleEntry, sgm_norm=("gamma", "beta")) -> list[ParamMap]:
    if e.kind == "norm":
        return [ParamMap(f"{e.sgm}.{sgm_norm[0]}", (f"{e.diffusers[0]}.weight",)),
                ParamMap(f"{e.sgm}.{sgm_norm[1]}", (f"{e.diffusers[0]}.bias",))]
    if e.fused:  # torch.nn.MultiheadAttention naming: in_proj_weight / in_proj_bias
        return [ParamMap(f"{e.sgm}_weight", tuple(f"{d}.weight" for d in e.diffusers), "concat"),
                ParamMap(f"{e.sgm}_bias", tuple(f"{d}.bias" for d in e.diffusers), "concat")]
    out = [ParamMap(f"{e.sgm}.weight", (f"{e.diffusers[0]}.weight",))]
    if e.bias:
        out.append(ParamMap(f"{e.sgm}.bias", (f"{e.diffusers[0]}.bias",)))
    return out


def _ldm_fused_params(e: ModuleEntry) -> list[ParamMap]:
    """MindONE's LDM text encoder (SD 1.x / 2.x) fuses q/k/v into a Dense, ``attn.attn.in_proj.weight`` /
    ``.bias`` (``ms_names_v1.txt``), where OpenCLIP has ``in_proj_weight``: the same rows, q then k then v."""
    return [ParamMap(f"{e.sgm}.weight", tuple(f"{d}.weight" for d in e.diffusers), "concat"),
            ParamMap(f"{e.sgm}.bias", tuple(f"{d}.bias" for d in e.diffusers), "concat")]


def _entry_params(e: ModuleEntry, layout: ModelLayout) -> list[ParamMap]:
    ldm = tuple(te.sgm_prefix for te in layout.text_encoders if te.style == "ldm")
    if e.fused and ldm and e.sgm.startswith(ldm):
        return _ldm_fused_params(e)
    return _module_params(e)


def _text_extras(layout: ModelLayout) -> list[ParamMap]:
    out = []
    for te in layout.text_encoders:
        d, s = te.diffusers_prefix + "text_model.embeddings.", te.sgm_prefix
        if te.style == "ldm":  # MindONE's LDM TextEncoder: a bare embedding_table, no text_projection
            out += [ParamMap(f"{s}embedding_table", (f"{d}token_embedding.weight",)),
                    ParamMap(f"{s}positional_embedding", (f"{d}position_embedding.weight",))]
        elif te.style == "hf":
            out += [ParamMap(f"{s}text_model.embeddings.token_embedding.embedding_table", (f"{d}token_embedding.weight",)),
                    ParamMap(f"{s}text_model.embeddings.position_embedding.embedding_table",
                             (f"{d}position_embedding.weight",))]
        else:
            out += [ParamMap(f"{s}token_embedding.embedding_table", (f"{d}token_embedding.weight",)),
                    ParamMap(f"{s}positional_embedding", (f"{d}position_embedding.weight",)),
                    ParamMap(f"{s}text_projection", (f"{te.diffusers_prefix}text_projection.weight",), "transpose")]
    return out


def _vae_resnet(s: str, d: str, cin: int, cout: int) -> list[ModuleEntry]:
    rows = [("norm1", "norm1", "norm", cin, cin, (1, 1)), ("conv1", "conv1", "conv", cin, cout, (3, 3)),
            ("norm2", "norm2", "norm", cout, cout, (1, 1)), ("conv2", "conv2", "conv", cout, cout, (3, 3))]
    if cin != cout:
        rows.append(("nin_shortcut", "conv_shortcut", "conv", cin, cout, (1, 1)))
    return [ModuleEntry(f"{s}.{a}", (f"{d}.{b}",), k, i, o, "vae", s, kk) for a, b, k, i, o, kk in rows]


def _vae_mid(s: str, d: str, ch: int) -> tuple[list[ModuleEntry], list[ParamMap]]:
    ents = _vae_resnet(f"{s}.block_1", f"{d}.resnets.0", ch, ch) + _vae_resnet(f"{s}.block_2", f"{d}.resnets.1", ch, ch)
    ents.append(ModuleEntry(f"{s}.attn_1.norm", (f"{d}.attentions.0.group_norm",), "norm", ch, ch, "vae", s))
    maps = []
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        for p in ("weight", "bias"):
            rule = "conv_linear" if p == "weight" else "copy"
            maps.append(ParamMap(f"{s}.attn_1.{a}.{p}", (f"{d}.attentions.0.{b}.{p}",), rule))
    return ents, maps


def vae_param_maps(vae: VaeLayout) -> list[ParamMap]:
    """ldm ``AutoencoderKL`` (decoder ``up`` reversed) <-> diffusers ``AutoencoderKL``."""
    S, D = VAE_SGM, VAE_DIFFUSERS
    ents: list[ModuleEntry] = []
    maps: list[ParamMap] = []
    boc, lpb, nb = vae.block_out_channels, vae.layers_per_block, len(vae.block_out_channels)

    def conv(s, d, i, o, k=(3, 3)):
        ents.append(ModuleEntry(S + s, (D + d,), "conv", i, o, "vae", s, k))

    # encoder
    conv("encoder.conv_in", "encoder.conv_in", vae.in_channels, boc[0])
    ch = boc[0]
    for i, out in enumerate(boc):
        for j in range(lpb):
            ents += _vae_resnet(f"{S}encoder.down.{i}.block.{j}", f"{D}encoder.down_blocks.{i}.resnets.{j}", ch, out)
            ch = out
        if i != nb - 1:
            conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ch, ch)
    e, m = _vae_mid(f"{S}encoder.mid", f"{D}encoder.mid_block", ch)
    ents += e
    maps += m
    ents.append(ModuleEntry(S + "encoder.norm_out", (D + "encoder.conv_norm_out",), "norm", ch, ch, "vae", "encoder"))
    conv("encoder.conv_out", "encoder.conv_out", ch, 2 * vae.latent_channels)
    conv("quant_conv", "quant_conv", 2 * vae.latent_channels, 2 * vae.latent_channels, (1, 1))
    # decoder
    conv("post_quant_conv", "post_quant_conv", vae.latent_channels, vae.latent_channels, (1, 1))
    ch = boc[-1]
    conv("decoder.conv_in", "decoder.conv_in", vae.latent_channels, ch)
    e, m = _vae_mid(f"{S}decoder.mid", f"{D}decoder.mid_block", ch)
    ents += e
    maps += m
    for up, level in enumerate(reversed(range(nb))):
        out = boc[level]
        for j in range(lpb + 1):
            ents += _vae_resnet(f"{S}decoder.up.{level}.block.{j}", f"{D}decoder.up_blocks.{up}.resnets.{j}", ch, out)
            ch = out
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", ch, ch)
    ents.append(ModuleEntry(S + "decoder.norm_out", (D + "decoder.conv_norm_out",), "norm", ch, ch, "vae", "decoder"))
    conv("decoder.conv_out", "decoder.conv_out", ch, vae.out_channels)
    return [p for e in ents for p in _module_params(e)] + maps


def param_maps(layout: ModelLayout, vae: VaeLayout | None = None) -> list[ParamMap]:
    """Every parameter of the model, SGM name <-> diffusers name(s) and rule."""
    if layout.is_transformer:  # the key map of SD3 / Flux lists Linears only, and there is no SGM model of them
        raise LoraParityError(f"layout '{layout.name}' ({layout.family.upper()}): whole-model SGM <-> diffusers "
                              f"weights exist for the UNet families only (mindone.diffusers loads diffusers' files)")
    km = keymap_for(layout)
    maps = [p for e in km.entries for p in _entry_params(e, layout)] + _text_extras(layout)
    if vae is not None:
        maps += vae_param_maps(vae)
    return maps


def sgm_only_params(layout: ModelLayout) -> dict[str, np.ndarray]:
    """SGM parameters with no diffusers counterpart, at their fixed values."""
    return {f"{te.sgm_prefix}logit_scale": np.array(LOGIT_SCALE_INIT, dtype=np.float32)
            for te in layout.text_encoders if te.style == "openclip"}


def normalize_diffusers_names(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5 flattens CLIPTextModel: put ``text_model.`` back so names are version-free."""
    out = {}
    for k, v in sd.items():
        if k.startswith("text_encoder.") and not k.startswith("text_encoder.text_model."):
            k = "text_encoder.text_model." + k[len("text_encoder."):]
        out[k] = v
    return out


def diffusers_to_sgm(sd: Mapping[str, np.ndarray], maps: Iterable[ParamMap], *, strict: bool = True,
                     ignore: tuple[str, ...] = ("text_encoder.text_model.embeddings.position_ids",
                                                "text_encoder_2.text_model.embeddings.position_ids")
                     ) -> dict[str, np.ndarray]:
    """Convert a diffusers state dict (component-prefixed names) to SGM names."""
    sd = normalize_diffusers_names(sd)
    out, used = {}, set()
    for m in maps:
        missing = [d for d in m.diffusers if d not in sd]
        if missing:
            if strict:
                raise KeyMapError("missing from the diffusers weights", key=missing[0])
            continue
        parts = [np.asarray(sd[d]) for d in m.diffusers]
        used.update(m.diffusers)
        if m.rule == "copy":
            out[m.sgm] = parts[0]
        elif m.rule == "transpose":
            out[m.sgm] = np.ascontiguousarray(parts[0].T)
        elif m.rule == "conv_linear":
            out[m.sgm] = parts[0].reshape(*parts[0].shape, 1, 1) if parts[0].ndim == 2 else parts[0]
        else:
            out[m.sgm] = np.concatenate(parts, axis=0)
    leftover = sorted(set(sd) - used - set(ignore))
    if leftover and strict:
        raise KeyMapError(f"{len(leftover)} diffusers weight(s) have no SGM name: {', '.join(leftover[:5])}",
                          key=leftover[0])
    return out


def sgm_to_diffusers(sd: Mapping[str, np.ndarray], maps: Iterable[ParamMap], *, strict: bool = True,
                     ignore: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Convert SGM-named weights to diffusers names (component-prefixed)."""
    out, used = {}, set()
    for m in maps:
        if m.sgm not in sd:
            if strict:
                raise KeyMapError("missing from the SGM weights", key=m.sgm)
            continue
        x = np.asarray(sd[m.sgm])
        used.add(m.sgm)
        if m.rule == "copy":
            out[m.diffusers[0]] = x
        elif m.rule == "transpose":
            out[m.diffusers[0]] = np.ascontiguousarray(x.T)
        elif m.rule == "conv_linear":
            out[m.diffusers[0]] = x.reshape(x.shape[0], x.shape[1])
        else:
            for d, part in zip(m.diffusers, np.split(x, len(m.diffusers), axis=0)):
                out[d] = part
    leftover = sorted(set(sd) - used - set(ignore))
    if leftover and strict:
        raise KeyMapError(f"{len(leftover)} SGM weight(s) have no diffusers name: {', '.join(leftover[:5])}",
                          key=leftover[0])
    return out
