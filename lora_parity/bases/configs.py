"""Built-in diffusers pipeline configs (SDXL base/refiner, tiny, tiny refiner) and the folder skeleton.

A base model the user names without downloading (``random:...``) or brings as one
SGM single file has no configs, tokenizers or scheduler of its own, so they come
from here: the released SDXL numbers (public facts) and the tiny test models.
:func:`write_skeleton` writes everything of a diffusers pipeline folder except
the weights; :func:`meta_state_shapes` lists the weights diffusers/transformers
expect (built on the meta device, nothing allocated), so the names written always
equal what ``from_pretrained`` loads.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from lora_parity.errors import LoraParityError
from lora_parity.fixtures.tiny_pipeline import (BOS_TOKEN, EOS_TOKEN, SDXL_SCHEDULER_CONFIG, build_clip_tokenizer,
                                      byte_units, tiny_vocab)
from lora_parity.convert.layout import (CLIP_BIGG_CONFIG, CLIP_H_CONFIG, CLIP_L_CONFIG, SD15_UNET_CONFIG,
                                       SD21_UNET_CONFIG, SDXL_BASE_UNET_CONFIG, SDXL_REFINER_UNET_CONFIG, ModelLayout,
                                       UNetLayout, sdxl_text_encoders)
from lora_parity.convert.tiny import (TINY_IMAGE_SIZE, TINY_REFINER_UNET_CONFIG, TINY_SD_CONFIGS, TINY_TE1_CONFIG,
                                     TINY_TE2_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG)

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
# what the released vae/config.json adds (written into generated folders)
SDXL_VAE_FOLDER_CONFIG = {"_class_name": "AutoencoderKL", **SDXL_VAE_CONFIG, "sample_size": 1024,
                          "force_upcast": True, "act_fn": "silu"}

# the real CLIP BPE vocabulary size; BOS/EOS sit at its last two ids as in openai/clip-vit-large-patch14
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID, CLIP_EOS_ID = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
TOKENIZER_2_PAD = "!"  # SDXL's tokenizer_2 pads with "!" (id 0), tokenizer with EOS

_CLIP_COMMON = {"vocab_size": CLIP_VOCAB_SIZE, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
                "bos_token_id": CLIP_BOS_ID, "eos_token_id": CLIP_EOS_ID}
SDXL_TE1_CONFIG = {**CLIP_L_CONFIG, **_CLIP_COMMON, "hidden_act": "quick_gelu", "pad_token_id": CLIP_EOS_ID}
SDXL_TE2_CONFIG = {**CLIP_BIGG_CONFIG, **_CLIP_COMMON, "hidden_act": "gelu", "pad_token_id": 0}


def clip_vocab() -> dict[str, int]:
    """A dense 49408-entry byte-level vocabulary: 512 byte units, unreachable fillers, BOS, EOS.

    With an empty merge list the tokenizer only ever emits byte units (ids < 512), BOS and EOS,
    so every id is < ``vocab_size`` and BOS/EOS equal the text-encoder configs' ids.
    """
    units = byte_units()
    vocab = {u: i for i, u in enumerate(units)}
    vocab.update({u + "</w>": 256 + i for i, u in enumerate(units)})
    vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), CLIP_BOS_ID)})
    vocab[BOS_TOKEN], vocab[EOS_TOKEN] = CLIP_BOS_ID, CLIP_EOS_ID
    assert len(vocab) == CLIP_VOCAB_SIZE
    return vocab


@dataclass(frozen=True)
class PipelineConfigs:
    """Every config of one SDXL-family pipeline; ``te1`` is None for refiners."""

    name: str
    unet: dict
    te1: dict | None
    te2: dict
    vae: dict
    image_size: int
    real_size: bool

    @property
    def is_refiner(self) -> bool:
        return self.te1 is None

    def components(self) -> dict[str, dict]:
        """Weight-holding component -> its config (diffusers or HF ``CLIPTextConfig`` dict)."""
        out = {"unet": self.unet}
        if self.te1 is not None:
            out["text_encoder"] = self.te1
        out.update(text_encoder_2=self.te2, vae=self.vae)
        return out

    def layout(self) -> ModelLayout:
        unet = UNetLayout.from_diffusers_config(self.unet, name=self.name)
        return ModelLayout(self.name, unet, sdxl_text_encoders(self.te1, self.te2, refiner=self.is_refiner))

    def vocab(self) -> dict[str, int]:
        return clip_vocab() if self.real_size else tiny_vocab()


PIPELINES: dict[str, PipelineConfigs] = {
    "sdxl-base": PipelineConfigs("sdxl-base", SDXL_BASE_UNET_CONFIG, SDXL_TE1_CONFIG, SDXL_TE2_CONFIG,
                                 SDXL_VAE_FOLDER_CONFIG, 1024, True),
    "sdxl-refiner": PipelineConfigs("sdxl-refiner", SDXL_REFINER_UNET_CONFIG, None, SDXL_TE2_CONFIG,
                                    SDXL_VAE_FOLDER_CONFIG, 1024, True),
    "tiny": PipelineConfigs("tiny", TINY_UNET_CONFIG, TINY_TE1_CONFIG, TINY_TE2_CONFIG, TINY_VAE_CONFIG,
                            TINY_IMAGE_SIZE, False),
    "tiny-refiner": PipelineConfigs("tiny-refiner", TINY_REFINER_UNET_CONFIG, None, TINY_TE2_CONFIG,
                                    TINY_VAE_CONFIG, TINY_IMAGE_SIZE, False),
}


# SD 1.x / 2.x (StableDiffusionPipeline): UNet and text-encoder configs of the released models and the tiny
# test ones; SD 2.x's text encoder is OpenCLIP-H as diffusers holds it (23 layers, gelu)
SD15_TE_CONFIG = {**CLIP_L_CONFIG, **_CLIP_COMMON, "hidden_act": "quick_gelu", "pad_token_id": 1}
SD21_TE_CONFIG = {**CLIP_H_CONFIG, **_CLIP_COMMON, "hidden_act": "gelu", "pad_token_id": 0}
# the released SD 1.5 / 2.1 VAE (the SDXL VAE's architecture, its own scaling factor)
SD_VAE_FOLDER_CONFIG = {**SDXL_VAE_FOLDER_CONFIG, "scaling_factor": 0.18215, "sample_size": 512}


@dataclass(frozen=True)
class SdPipelineConfigs:
    """Every config of one SD 1.x / 2.x pipeline (``StableDiffusionPipeline``: one CLIP text encoder).

    SD 2.x is v-prediction (as SD 2.1 768-v) and its tokenizer pads with "!" (OpenCLIP's id 0); SD 1.x
    predicts noise and pads with EOS."""

    name: str
    family: str  # "sd1" | "sd2"
    unet: dict
    te: dict
    vae: dict
    image_size: int
    real_size: bool
    is_refiner: bool = False

    def components(self) -> dict[str, dict]:
        return {"unet": self.unet, "text_encoder": self.te, "vae": self.vae}

    def layout(self) -> ModelLayout:
        from lora_parity.convert.layout import sd_text_encoder

        unet = UNetLayout.from_diffusers_config(self.unet, name=self.name)
        return ModelLayout(self.name, unet, (sd_text_encoder(self.te, self.family),), family=self.family)

    def vocab(self) -> dict[str, int]:
        return clip_vocab() if self.real_size else tiny_vocab()

    def scheduler(self) -> dict:
        return {**SDXL_SCHEDULER_CONFIG, "prediction_type": "v_prediction" if self.family == "sd2" else "epsilon"}

    def model_index(self) -> dict:
        from diffusers import __version__ as diffusers_version

        return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
                "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
                "requires_safety_checker": False, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


SD_FAMILY_PIPELINES: dict[str, SdPipelineConfigs] = {
    "sd15": SdPipelineConfigs("sd15", "sd1", SD15_UNET_CONFIG, SD15_TE_CONFIG, SD_VAE_FOLDER_CONFIG, 512, True),
    "sd21": SdPipelineConfigs("sd21", "sd2", SD21_UNET_CONFIG, SD21_TE_CONFIG, SD_VAE_FOLDER_CONFIG, 768, True),
    "tiny-sd1": SdPipelineConfigs("tiny-sd1", "sd1", *TINY_SD_CONFIGS["sd1"], TINY_VAE_CONFIG, TINY_IMAGE_SIZE,
                                  False),
    "tiny-sd2": SdPipelineConfigs("tiny-sd2", "sd2", *TINY_SD_CONFIGS["sd2"], TINY_VAE_CONFIG, TINY_IMAGE_SIZE,
                                  False),
}
#: (UNet config, text-encoder config) by layout name, for hollow pipelines (the shipped suite)
SD_PIPELINES: dict[str, tuple[dict, dict]] = {n: (c.unet, c.te) for n, c in SD_FAMILY_PIPELINES.items()}


def pipeline_configs(name: str) -> PipelineConfigs:
    try:
        return PIPELINES[name]
    except KeyError:
        raise LoraParityError(f"unknown built-in model {name!r} (known: {', '.join(PIPELINES)})") from None


def model_index(cfgs: PipelineConfigs) -> dict:
    """``model_index.json`` as the released base / refiner folders have it."""
    from diffusers import __version__ as diffusers_version

    te1 = [None, None] if cfgs.is_refiner else ["transformers", "CLIPTextModel"]
    tok1 = [None, None] if cfgs.is_refiner else ["transformers", "CLIPTokenizer"]
    out = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if cfgs.is_refiner else "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": not cfgs.is_refiner,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": te1,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": tok1,
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if cfgs.is_refiner:
        out["requires_aesthetics_score"] = True
    return out


def _plain(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def meta_model(component: str, cfg: dict):
    """The diffusers / transformers model of ``component`` on the meta device (no memory).

    One per component and configuration per process: building SDXL's module tree takes 0.05-0.4 s even on
    the meta device, and generating a base, checking a single file and the tests ask for the same ones again
    (the conversion layer built 138 of them: 6.1 s of its 31 s).  Callers only read it (its config, its
    state_dict's names and shapes)."""
    return _meta_model(component, json.dumps(cfg, sort_keys=True, allow_nan=False))


@functools.lru_cache(maxsize=32)
def _meta_model(component: str, cfg_json: str):
    import torch

    cfg = json.loads(cfg_json)

    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**_plain(cfg))
        if component == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**_plain(cfg))
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
        return cls(CLIPTextConfig(**cfg))


def meta_state_shapes(component: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Saved weight name -> shape of ``component``, in ``state_dict`` order (persistent entries only).

    Names as the Hub's SDXL folders spell them, which every reader accepts: transformers 5
    flattens ``CLIPTextModel`` (no ``text_model.``) but still loads the prefixed names, while
    transformers 4 and mindone.transformers need the prefix (without it they silently
    initialise CLIP-L randomly)."""
    from lora_parity.convert.fullweights import normalize_diffusers_names

    shapes = {f"{component}.{k}": tuple(v.shape) for k, v in meta_model(component, cfg).state_dict().items()}
    return {k[len(component) + 1:]: v for k, v in normalize_diffusers_names(shapes).items()}


def write_tokenizer(out_dir: Path, vocab: dict[str, int], pad_token: str) -> None:
    """A CLIP tokenizer folder: ``tokenizer.json`` (fast) plus ``vocab.json``/``merges.txt`` (slow)."""
    tok = build_clip_tokenizer(vocab, pad_token)
    tok.save_pretrained(str(out_dir))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def write_skeleton(out_dir: Path, cfgs: PipelineConfigs | SdPipelineConfigs) -> None:
    """Everything of a diffusers pipeline folder but the weights (configs, tokenizers, scheduler)."""
    from diffusers import EulerDiscreteScheduler

    out_dir.mkdir(parents=True, exist_ok=True)
    index = cfgs.model_index() if isinstance(cfgs, SdPipelineConfigs) else model_index(cfgs)
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, allow_nan=False) + "\n")
    for comp, cfg in cfgs.components().items():
        (out_dir / comp).mkdir(exist_ok=True)
        model = meta_model(comp, cfg)
        if comp in ("unet", "vae"):
            model.save_config(out_dir / comp)
        else:
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(out_dir / comp)
    vocab = cfgs.vocab()
    if isinstance(cfgs, SdPipelineConfigs):
        write_tokenizer(out_dir / "tokenizer", vocab, TOKENIZER_2_PAD if cfgs.family == "sd2" else EOS_TOKEN)
        EulerDiscreteScheduler(**cfgs.scheduler()).save_config(out_dir / "scheduler")
        return
    if not cfgs.is_refiner:
        write_tokenizer(out_dir / "tokenizer", vocab, EOS_TOKEN)
    write_tokenizer(out_dir / "tokenizer_2", vocab, TOKENIZER_2_PAD)
    EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).save_config(out_dir / "scheduler")
