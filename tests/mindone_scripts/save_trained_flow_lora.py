"""Run in the interpreter that has mindone: save an SD3 / Flux LoRA the way mindone.diffusers' trainers do.

``train_dreambooth_lora_sd3.py``: ``transformer.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights=
"gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``; ``train_dreambooth_lora_flux.py`` (no
``--lora_layers``): the attention projections of both streams and the feed-forwards of the double blocks
(``attn.to_k/q/v``, ``attn.to_out.0``, ``attn.add_k/q/v_proj``, ``attn.to_add_out``, ``ff.net.0.proj``,
``ff.net.2``, ``ff_context.net.0.proj``, ``ff_context.net.2``).  With ``--train_text_encoder`` the CLIP
encoders (SD3: CLIP-L and CLIP-G; Flux: CLIP-L) get ``q_proj, k_proj, v_proj, out_proj``.  Saved by the
pipeline's ``save_lora_weights(transformer_lora_layers=..., text_encoder_lora_layers=...)`` from
``get_peft_model_state_dict``; before that, ``ms.save_checkpoint(transformer)`` as the intermediate
``checkpoint-100/pytorch_model.ckpt`` a run leaves behind.  lora_B gets random values (a trained LoRA; gaussian init leaves it zero).
On CPU the transformer's construction needs the compat layer (mint.arange), applied first.

usage: python save_trained_flow_lora.py sd3|flux PIPELINE_DIR OUT_DIR RANK [VARIANT]
"""
import sys
from pathlib import Path

import mindspore as ms
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lora_parity.backends.mindone.compat import apply_cpu_compat  # noqa: E402

apply_cpu_compat("CPU")
from mindone import diffusers as md  # noqa: E402
from mindone.peft import LoraConfig  # noqa: E402
from mindone.peft.utils import get_peft_model_state_dict  # noqa: E402
from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

family, base, out_dir, rank = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
variant = (sys.argv[5] if len(sys.argv) > 5 else None) or None
kw = {"variant": variant, "local_files_only": True}
TRANSFORMER_TARGETS = {
    "sd3": ["to_k", "to_q", "to_v", "to_out.0"],
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"],
}
cls = md.SD3Transformer2DModel if family == "sd3" else md.FluxTransformer2DModel
transformer = cls.from_pretrained(str(base), subfolder="transformer", **kw)
transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                   target_modules=TRANSFORMER_TARGETS[family]))
te_cls = {"sd3": [("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection)],
          "flux": [("text_encoder", CLIPTextModel)]}[family]
encoders = {}
for comp, c in te_cls:
    encoders[comp] = c.from_pretrained(str(base), subfolder=comp, **kw)
    encoders[comp].add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
rng = np.random.default_rng(5)
for model in [transformer, *encoders.values()]:
    for name, p in model.parameters_and_names():
        if ".lora_B." in name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
out_dir.mkdir(parents=True, exist_ok=True)
# an intermediate checkpoint as the trainers write it (accelerate-style checkpoint-N/): the whole wrapped model
(out_dir / "checkpoint-100").mkdir(exist_ok=True)
ms.save_checkpoint(transformer, str(out_dir / "checkpoint-100" / "pytorch_model.ckpt"))
layers = {"transformer_lora_layers": get_peft_model_state_dict(transformer),
          "text_encoder_lora_layers": get_peft_model_state_dict(encoders["text_encoder"])}
if family == "sd3":
    layers["text_encoder_2_lora_layers"] = get_peft_model_state_dict(encoders["text_encoder_2"])
pipe = md.StableDiffusion3Pipeline if family == "sd3" else md.FluxPipeline
pipe.save_lora_weights(save_directory=str(out_dir), **layers, safe_serialization=True)
print("ok")
