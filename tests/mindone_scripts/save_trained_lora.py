"""Run in the interpreter that has mindone: save a LoRA the way mindone.diffusers' SD trainers do.

``train_dreambooth_lora.py`` (SD 1.x / 2.x): ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights=
"gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`` and, with ``--train_text_encoder``,
``text_encoder.add_adapter(LoraConfig(..., target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))``; at the
end ``StableDiffusionPipeline.save_lora_weights(unet_lora_layers=get_peft_model_state_dict(unet),
text_encoder_lora_layers=get_peft_model_state_dict(text_encoder))``.  lora_B gets random values (a trained
LoRA; gaussian init leaves it zero).

usage: python save_trained_lora.py PIPELINE_DIR OUT_DIR RANK [VARIANT]
"""
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from mindone.diffusers import StableDiffusionPipeline, UNet2DConditionModel
from mindone.peft import LoraConfig
from mindone.peft.utils import get_peft_model_state_dict
from mindone.transformers import CLIPTextModel

base, out_dir, rank = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
variant = sys.argv[4] if len(sys.argv) > 4 else None
unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet", variant=variant, local_files_only=True)
te = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder", variant=variant, local_files_only=True)
unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
te.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
rng = np.random.default_rng(5)
for model in (unet, te):
    for name, p in model.parameters_and_names():
        if ".lora_B." in name:
            p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
out_dir.mkdir(parents=True, exist_ok=True)
StableDiffusionPipeline.save_lora_weights(save_directory=str(out_dir), unet_lora_layers=get_peft_model_state_dict(unet),
                                          text_encoder_lora_layers=get_peft_model_state_dict(te),
                                          safe_serialization=True)
print("ok")
