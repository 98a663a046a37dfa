"""Which model family a LoRA file is for, from its key names alone.

Shapes tell sizes apart (``lora_set.choose_layout`` fits them against the presets), but a transformer LoRA of a
size no preset has must still be told from a UNet one, and SD3 from Flux, so that the error can say which
``--layout`` is missing and so that the UNet presets are never tried on it (nor the transformer presets on a
UNet LoRA).  The markers are diffusers' module names (PEFT), OneTrainer's / ComfyUI's ``lora_transformer_`` and
text-encoder numbering (kohya), and BFL's block names that sd-scripts' Flux LoRA uses.
"""
from __future__ import annotations

import re
from typing import Iterable

#: name fragments only a Flux transformer has: single-stream blocks, the packed-latent embedder, the guidance
#: embedder (PEFT "." and kohya "_" spellings), BFL's double / single blocks (sd-scripts' lora_flux)
_FLUX = re.compile(r"(?:^|[._])(?:single_transformer_blocks|x_embedder|guidance_embedder)[._]"
                   r"|^lora_unet_(?:double_blocks|single_blocks)_")
#: T5 at SD3's third / Flux's second text-encoder slot (PEFT), CLIP at SD3's text_encoder_2 with a transformer
_T5_AT = re.compile(r"^(?:text_encoder_(?P<peft>[23])\.encoder\.block\.|lora_te(?P<kohya>[23])_encoder_block_)")
_TRANSFORMER = re.compile(r"^(?:transformer\.|lora_transformer_)")
_SD3_ONLY = re.compile(r"^(?:transformer\.pos_embed\.|lora_transformer_pos_embed_|text_encoder_3\.)")
_CLIP2 = re.compile(r"^(?:text_encoder_2\.(?:text_model\.)?encoder\.layers\.|lora_te2_text_model_encoder_layers_)")


def family_from_keys(keys: Iterable[str]) -> str | None:
    """``"sd3"``, ``"flux"``, ``"transformer"`` (SD3 or Flux, names cannot tell) or None (no transformer marker:
    a UNet family or text encoders only)."""
    transformer = flux = sd3 = False
    clip2 = False
    for k in keys:
        if _FLUX.search(k):
            flux = True
        if _TRANSFORMER.match(k):
            transformer = True
        if _SD3_ONLY.match(k):
            sd3 = True
        m = _T5_AT.match(k)
        if m:
            slot = m.group("peft") or m.group("kohya")
            if m.group("peft") == "3":
                sd3 = True
            elif slot == "2":  # T5 second: Flux (CLIP-L, T5); lora_te3_ is ComfyUI's other Flux T5 spelling
                flux = True
        if _CLIP2.match(k):
            clip2 = True
    if flux and not sd3:
        return "flux"
    if sd3 and not flux:
        return "sd3"
    if flux and sd3:
        return "transformer"
    if transformer:
        return "sd3" if clip2 else "transformer"
    return None
