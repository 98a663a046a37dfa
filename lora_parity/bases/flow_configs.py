"""Built-in SD3 and Flux pipelines (tiny and real size): configs, model index, tokenizers, scheduler.

SD3 and Flux are flow-matching transformer models ("flow" families here): a diffusers transformer
(``SD3Transformer2DModel`` / ``FluxTransformer2DModel``) instead of a UNet, CLIP text encoders plus a
T5 v1.1 encoder, a 16-channel VAE with a shift, and ``FlowMatchEulerDiscreteScheduler``.  Like the
SDXL configs (:mod:`.configs`), :func:`write_flow_skeleton` writes everything of a diffusers folder
but the weights, so ``random:sd3`` / ``random:flux`` / ``random:tiny-sd3`` / ``random:tiny-flux`` are
generated offline.  The real-size numbers are the released models' public configs (SD3-medium,
FLUX.1-dev, T5 v1.1 XXL).

Tokenizers are generated, never downloaded: CLIP as for SDXL; T5 as a ``tokenizers`` Unigram model
with byte-level pieces saved as ``tokenizer.json`` with a ``T5TokenizerFast`` config, which
transformers 4 (mindone's) and 5 both load without sentencepiece.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_parity.bases.configs import (SDXL_TE1_CONFIG, SDXL_TE2_CONFIG, SDXL_VAE_FOLDER_CONFIG, TOKENIZER_2_PAD,
                                       clip_vocab, write_tokenizer)
from lora_parity.convert.layout import FLUX_DEV_TRANSFORMER_CONFIG, SD3_MEDIUM_TRANSFORMER_CONFIG
from lora_parity.convert.layout import T5_XXL_CONFIG as _T5_XXL
from lora_parity.convert.tiny import (TINY_FLUX_TRANSFORMER_CONFIG, TINY_FLUX_VAE_CONFIG, TINY_IMAGE_SIZE,
                                      TINY_SD3_CLIP_CONFIG, TINY_SD3_CLIP_G_CONFIG, TINY_SD3_TRANSFORMER_CONFIG,
                                      TINY_SD3_VAE_CONFIG, TINY_T5_CONFIG, TINY_TE1_CONFIG)
from lora_parity.fixtures.tiny_pipeline import EOS_TOKEN, tiny_vocab

FLOW_FAMILIES = ("sd3", "flux")
PIPELINE_CLASSES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMER_CLASSES = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}

# the released models' configs (public facts) live with the key map; the folder's T5 adds its token ids
T5_XXL_CONFIG = {**_T5_XXL, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
                 "layer_norm_epsilon": 1e-6}
_FLOW_VAE = {**SDXL_VAE_FOLDER_CONFIG, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
             "force_upcast": True}
SD3_VAE_FOLDER_CONFIG = {**_FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_FOLDER_CONFIG = {**_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                         "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
#: T5 tokens the tiny pipelines encode (diffusers' own default is 256 for SD3 and 512 for Flux-dev)
TINY_MAX_SEQUENCE_LENGTH = 16
REAL_MAX_SEQUENCE_LENGTH = 256


@dataclass(frozen=True)
class FlowPipelineConfigs:
    """Every config of one SD3 or Flux pipeline; ``text_encoders`` maps component -> (class, config)."""

    name: str
    family: str  # "sd3" | "flux"
    transformer: dict
    text_encoders: tuple[tuple[str, str, dict], ...]  # (component, transformers class, config)
    vae: dict
    image_size: int
    real_size: bool
    is_refiner: bool = False

    def components(self) -> dict[str, dict]:
        out = {"transformer": self.transformer}
        out.update({comp: cfg for comp, _, cfg in self.text_encoders})
        out["vae"] = self.vae
        return out

    def encoder_class(self, component: str) -> str:
        return next(cls for comp, cls, _ in self.text_encoders if comp == component)

    @property
    def max_sequence_length(self) -> int:
        return REAL_MAX_SEQUENCE_LENGTH if self.real_size else TINY_MAX_SEQUENCE_LENGTH

    def scheduler(self) -> dict:
        return SD3_SCHEDULER_CONFIG if self.family == "sd3" else FLUX_SCHEDULER_CONFIG

    def vocab(self) -> dict[str, int]:
        return clip_vocab() if self.real_size else tiny_vocab()

    def t5_vocab_size(self) -> int:
        return next(cfg["vocab_size"] for _, cls, cfg in self.text_encoders if cls == "T5EncoderModel")

    def model_index(self) -> dict:
        from diffusers import __version__ as diffusers_version

        out = {"_class_name": PIPELINE_CLASSES[self.family], "_diffusers_version": diffusers_version,
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "transformer": ["diffusers", TRANSFORMER_CLASSES[self.family]],
               "vae": ["diffusers", "AutoencoderKL"]}
        for i, (comp, cls, _) in enumerate(self.text_encoders):
            out[comp] = ["transformers", cls]
            out[comp.replace("text_encoder", "tokenizer")] = [
                "transformers", "T5TokenizerFast" if cls == "T5EncoderModel" else "CLIPTokenizer"]
        if self.family == "flux":
            out.update(feature_extractor=[None, None], image_encoder=[None, None])
        else:
            out.update(feature_extractor=[None, None], image_encoder=[None, None])
        return out


def _clip(cfg: dict, real: dict | None = None) -> dict:
    return dict(cfg) if real is None else {**real}


_SD3_TE = (("text_encoder", "CLIPTextModelWithProjection", SDXL_TE1_CONFIG),
           ("text_encoder_2", "CLIPTextModelWithProjection", SDXL_TE2_CONFIG),
           ("text_encoder_3", "T5EncoderModel", T5_XXL_CONFIG))
_FLUX_TE = (("text_encoder", "CLIPTextModel", SDXL_TE1_CONFIG),
            ("text_encoder_2", "T5EncoderModel", T5_XXL_CONFIG))
_TINY_SD3_TE = (("text_encoder", "CLIPTextModelWithProjection", TINY_SD3_CLIP_CONFIG),
                ("text_encoder_2", "CLIPTextModelWithProjection", TINY_SD3_CLIP_G_CONFIG),
                ("text_encoder_3", "T5EncoderModel", TINY_T5_CONFIG))
_TINY_FLUX_TE = (("text_encoder", "CLIPTextModel", TINY_TE1_CONFIG),
                 ("text_encoder_2", "T5EncoderModel", TINY_T5_CONFIG))

FLOW_PIPELINES: dict[str, FlowPipelineConfigs] = {
    "sd3": FlowPipelineConfigs("sd3", "sd3", SD3_MEDIUM_TRANSFORMER_CONFIG, _SD3_TE, SD3_VAE_FOLDER_CONFIG, 1024, True),
    "flux": FlowPipelineConfigs("flux", "flux", FLUX_DEV_TRANSFORMER_CONFIG, _FLUX_TE, FLUX_VAE_FOLDER_CONFIG, 1024,
                                True),
    "tiny-sd3": FlowPipelineConfigs("tiny-sd3", "sd3", TINY_SD3_TRANSFORMER_CONFIG, _TINY_SD3_TE, TINY_SD3_VAE_CONFIG,
                                    TINY_IMAGE_SIZE, False),
    "tiny-flux": FlowPipelineConfigs("tiny-flux", "flux", TINY_FLUX_TRANSFORMER_CONFIG, _TINY_FLUX_TE,
                                     TINY_FLUX_VAE_CONFIG, TINY_IMAGE_SIZE, False),
}


def _plain(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def flow_meta_model(component: str, cls_name: str, cfg: dict):
    """The diffusers / transformers model of one SD3 / Flux component on the meta device."""
    import torch

    with torch.device("meta"):
        if component == "transformer":
            import diffusers

            return getattr(diffusers, cfg["_class_name"])(**_plain(cfg))
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**_plain(cfg))
        import transformers

        config_cls = transformers.T5Config if cls_name == "T5EncoderModel" else transformers.CLIPTextConfig
        return getattr(transformers, cls_name)(config_cls(**cfg))


def parameter_count(cfgs: FlowPipelineConfigs) -> dict[str, int]:
    """Parameters per component (built on the meta device): how big a pipeline is before generating it."""
    return {comp: sum(p.numel() for p in flow_meta_model(comp, _cls(cfgs, comp), cfg).parameters())
            for comp, cfg in cfgs.components().items()}


def _cls(cfgs: FlowPipelineConfigs, component: str) -> str:
    return "" if component in ("transformer", "vae") else cfgs.encoder_class(component)


def flow_state_shapes(cfgs: FlowPipelineConfigs, component: str) -> dict[str, tuple[int, ...]]:
    """Saved weight name -> shape, as ``from_pretrained`` loads them (persistent entries only).

    T5's ``encoder.embed_tokens.weight`` (tied to ``shared.weight``) is saved too, equal values, as the
    released SD3 / Flux T5 files have it (transformers otherwise reports it missing); ``CLIPTextModel``
    keeps its ``text_model.`` prefix as in the SDXL folders (transformers 5 flattens it, transformers 4 /
    mindone need it); the ``WithProjection`` models' ``text_projection`` sits beside ``text_model``."""
    model = flow_meta_model(component, _cls(cfgs, component), cfgs.components()[component])
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if _cls(cfgs, component) == "T5EncoderModel":  # both names of the tied embedding, as released files hold
        return state
    if _cls(cfgs, component) != "CLIPTextModel":  # the projection models keep their own names
        return state
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


def build_t5_tokenizer(vocab_size: int):
    """A ``T5TokenizerFast`` over a Unigram vocabulary of byte-level pieces (offline, no sentencepiece).

    Ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>`` as T5's; then the word-start marker and printable ASCII;
    the rest unreachable fillers up to ``vocab_size`` (the embedding's rows), so every id the
    tokenizer emits is a valid row and ``</s>`` ends every sequence as T5's post-processor does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    if vocab_size < len(pieces):
        raise ValueError(f"a T5 vocabulary needs at least {len(pieces)} entries, got {vocab_size}")
    pieces += [(f"<unused{i}>", -100.0) for i in range(vocab_size - len(pieces))]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=512)


def write_t5_tokenizer(out_dir: Path, vocab_size: int, max_length: int = 512) -> None:
    """``tokenizer.json`` plus a ``tokenizer_config.json`` naming ``T5TokenizerFast``.

    The config is written here, not by ``save_pretrained``: transformers 5 writes ``T5Tokenizer``
    (its fast class) and an ``extra_special_tokens`` list, which transformers 4 reads as the
    sentencepiece class and rejects."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_t5_tokenizer(vocab_size).backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "T5TokenizerFast", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
           "extra_ids": 0, "model_max_length": int(max_length)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, allow_nan=False) + "\n")


def write_flow_skeleton(out_dir: Path, cfgs: FlowPipelineConfigs) -> None:
    """Everything of an SD3 / Flux pipeline folder but the weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_index.json").write_text(json.dumps(cfgs.model_index(), indent=2, allow_nan=False) + "\n")
    for comp, cfg in cfgs.components().items():
        (out_dir / comp).mkdir(exist_ok=True)
        model = flow_meta_model(comp, _cls(cfgs, comp), cfg)
        if comp in ("transformer", "vae"):
            model.save_config(out_dir / comp)
        else:
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(out_dir / comp)
    vocab = cfgs.vocab()
    for comp, cls, _ in cfgs.text_encoders:
        tok_dir = out_dir / comp.replace("text_encoder", "tokenizer")
        if cls == "T5EncoderModel":
            write_t5_tokenizer(tok_dir, cfgs.t5_vocab_size(), 512 if cfgs.real_size else TINY_MAX_SEQUENCE_LENGTH)
        else:  # SD3's CLIP-G pads with "!" as SDXL's bigG; CLIP-L with EOS
            write_tokenizer(tok_dir, vocab, TOKENIZER_2_PAD if comp == "text_encoder_2" else EOS_TOKEN)
    FlowMatchEulerDiscreteScheduler(**cfgs.scheduler()).save_config(out_dir / "scheduler")
