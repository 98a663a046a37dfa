"""Which MindSpore (SGM) activation corresponds to which diffusers module output.

Generated from the key map: each SGM block aligns with the diffusers module that
ends it (the last module the walk emits for that block), so a UNet of any
layout is aligned without a hand-written list.
"""
from __future__ import annotations

import json
from pathlib import Path

from lora_parity.convert.keymap import UNET_SGM, keymap_for
from lora_parity.convert.layout import ModelLayout, layout_from_pipeline_dir
from lora_parity.parity.metrics import Aligned


def _ending_module(diffusers_name: str) -> str:
    parts = diffusers_name.split(".")
    if parts[1] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:5])
    if parts[1] == "mid_block":
        return "unet.mid_block"
    if parts[1] in ("time_embedding", "add_embedding"):
        return ".".join(parts[:2])
    return diffusers_name


def timestep_suffix(t, timesteps) -> str:
    """Activation-name suffix for one of several timesteps ("" when there is only one)."""
    return "" if len(timesteps) == 1 else f"@t{float(t):g}"


def unet_alignment(layout: ModelLayout, timesteps=(None,)) -> list[Aligned]:
    """Every UNet block; repeated per timestep with an ``@t<T>`` suffix when there are several."""
    last: dict[str, str] = {}
    for e in keymap_for(layout).entries:
        if e.component == "unet":
            last[e.block] = _ending_module(e.diffusers[0])
    out = []
    for t in timesteps:
        sfx = timestep_suffix(t, timesteps)
        out += [Aligned(UNET_SGM + block + sfx, dif + sfx, "unet", i) for i, (block, dif) in enumerate(last.items())]
    return out


def text_alignment(layout: ModelLayout) -> list[Aligned]:
    out = []
    for te in layout.text_encoders:
        comp = te.diffusers_prefix.rstrip(".")
        p = te.sgm_prefix
        if te.style == "hf":
            names = [f"{p}text_model.embeddings"] + [f"{p}text_model.encoder.layers.{i}" for i in range(te.num_layers)]
            tail = [(f"{p}text_model.final_layer_norm", f"{comp}.last_hidden_state"), (f"{p}pooled", f"{comp}.pooler_output")]
        elif te.style == "ldm":  # MindONE's SD 1.x / 2.x TextEncoder; diffusers holds a CLIPTextModel (pooler_output)
            names = [f"{p}embedding_table"] + [f"{p}transformer_layer.resblocks.{i}" for i in range(te.num_layers)]
            tail = [(f"{p}ln_final", f"{comp}.last_hidden_state"), (f"{p}pooled", f"{comp}.pooler_output")]
        else:
            names = [f"{p}token_embedding"] + [f"{p}transformer.resblocks.{i}" for i in range(te.num_layers)]
            tail = [(f"{p}ln_final", f"{comp}.last_hidden_state"), (f"{p}text_projection", f"{comp}.text_embeds")]
        pairs = [(n, f"{comp}.hidden_states.{i}") for i, n in enumerate(names)] + tail
        out += [Aligned(s, d, comp, i) for i, (s, d) in enumerate(pairs)]
    return out


def conditioning_alignment(family: str = "sdxl") -> list[Aligned]:
    """The UNet's inputs built from the prompt: cross-attention context and (SDXL) the vector y."""
    out = [Aligned("conditioner.context", "conditioning.prompt_embeds", "conditioning", 0)]
    if family == "sdxl":
        out.append(Aligned("conditioner.vector", "conditioning.add_embedding_input", "conditioning", 1))
    return out


def vae_alignment(num_blocks: int, prefix: str = "first_stage_model.") -> list[Aligned]:
    pairs = [("post_quant_conv", "vae.post_quant_conv"), ("decoder.conv_in", "vae.decoder.conv_in"),
             ("decoder.mid.block_2", "vae.decoder.mid_block")]
    pairs += [(f"decoder.up.{level}", f"vae.decoder.up_blocks.{num_blocks - 1 - level}")
              for level in reversed(range(num_blocks))]
    pairs += [("decoder.conv_out", "vae.decoder.conv_out")]
    return [Aligned(prefix + s, d, "vae", i) for i, (s, d) in enumerate(pairs)]


def flow_alignment(configs_dir: Path, steps: int) -> list[Aligned]:
    """SD3 / Flux (:mod:`lora_parity.backends.flow`): every point by its diffusers name on both sides, the
    transformer's per denoising step (``#k`` for step k > 0, as the capture names repeated calls)."""
    folder = Path(configs_dir)
    index = json.loads((folder / "model_index.json").read_text())
    out: list[Aligned] = []
    for comp in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        entry = index.get(comp)
        if not entry or entry[0] is None:
            continue
        cfg = json.loads((folder / comp / "config.json").read_text())
        if entry[1] == "T5EncoderModel":
            names = (["encoder.embed_tokens"] + [f"encoder.block.{i}" for i in range(cfg["num_layers"])]
                     + ["encoder.final_layer_norm"])
        else:
            names = (["embeddings"] + [f"encoder.layers.{i}" for i in range(cfg["num_hidden_layers"])]
                     + ["final_layer_norm"])
        out += [Aligned(f"{comp}.{n}", f"{comp}.{n}", comp, i) for i, n in enumerate(names)]
    cond = ["conditioning.prompt_embeds", "conditioning.pooled_prompt_embeds"]
    out += [Aligned(n, n, "conditioning", i) for i, n in enumerate(cond)]
    tcfg = json.loads((folder / "transformer" / "config.json").read_text())
    flux = index.get("_class_name") == "FluxPipeline"
    names = ["x_embedder" if flux else "pos_embed", "time_text_embed", "context_embedder"]
    for i in range(int(tcfg["num_layers"])):
        names.append(f"transformer_blocks.{i}")
        last_sd3 = not flux and i == int(tcfg["num_layers"]) - 1  # SD3's last block: context_pre_only
        if not last_sd3:
            names.append(f"transformer_blocks.{i}.context")
    names += [f"single_transformer_blocks.{i}" for i in range(int(tcfg.get("num_single_layers", 0) if flux else 0))]
    names += ["norm_out", "proj_out"]
    for k in range(max(int(steps), 1)):
        sfx = f"#{k}" if k else ""
        out += [Aligned(f"transformer.{n}{sfx}", f"transformer.{n}{sfx}", "transformer", i)
                for i, n in enumerate(names)]
    vae_blocks = len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"])
    vae = (["decoder.conv_in", "decoder.mid_block"] + [f"decoder.up_blocks.{i}" for i in range(vae_blocks)]
           + ["decoder.conv_out"])
    out += [Aligned(f"vae.{n}", f"vae.{n}", "vae", i) for i, n in enumerate(vae)]
    return out


#: pipeline class -> family of the transformer (flow-matching) models
FLOW_PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def flow_family(pipeline_dir: str | Path) -> str | None:
    """"sd3" / "flux" for an SD3 / Flux folder (its model_index.json's pipeline class), else None."""
    try:
        index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return FLOW_PIPELINE_FAMILIES.get(index.get("_class_name")) if isinstance(index, dict) else None


def is_flow_folder(pipeline_dir: str | Path) -> bool:
    return flow_family(pipeline_dir) is not None


def alignment_for(configs_dir: Path, timesteps, naming: str, steps: int | None = None) -> list[Aligned]:
    """Every compared point of the pipeline folder's model; a backend that records diffusers names is
    aligned name to name (both fields the diffusers name)."""
    if is_flow_folder(configs_dir):
        return flow_alignment(configs_dir, steps or 1)
    layout = layout_from_pipeline_dir(Path(configs_dir))
    vae_blocks = len(json.loads((Path(configs_dir) / "vae" / "config.json").read_text())["block_out_channels"])
    points = (text_alignment(layout) + conditioning_alignment(layout.family) + unet_alignment(layout, timesteps)
              + vae_alignment(vae_blocks))
    if naming == "diffusers":
        points = [Aligned(a.diffusers, a.diffusers, a.component, a.depth) for a in points]
    return points


def block_of(module_sgm: str, alignment: list[Aligned]) -> Aligned | None:
    """The aligned block that holds an SGM module (``...input_blocks.4.1.transformer_blocks.0.attn1.to_q``
    -> ``...input_blocks.4``): the longest aligned SGM name that prefixes it (timestep suffixes ignored)."""
    best = None
    for a in alignment:
        name = a.sgm.split("@t")[0]
        if module_sgm.startswith(name + ".") and (best is None or len(name) > len(best.sgm.split("@t")[0])):
            best = a
    return best
