"""Run in the interpreter that has mindone: what mindone.diffusers' LoRA trainers do at a checkpoint step.

``train_text_to_image_lora_sdxl.py`` / ``train_dreambooth_lora*.py``: ``unet.add_adapter(LoraConfig(r, lora_alpha=r,
init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``, then at step N
``ms.save_checkpoint(unet, "checkpoint-N/pytorch_model.ckpt")``, and at the end
``get_peft_model_state_dict(unet)`` -> ``save_lora_weights`` (``pytorch_lora_weights.safetensors``).
lora_B is given random values (a trained LoRA; gaussian init leaves it zero).

usage: python save_training_checkpoint.py UNET_CONFIG_JSON OUT_DIR RANK
"""
import json
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from mindone.diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from mindone.peft import LoraConfig
from mindone.peft.utils import get_peft_model_state_dict

cfg_path, out_dir, rank = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
unet = UNet2DConditionModel.from_config(json.loads(cfg_path.read_text()))
unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                            target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
rng = np.random.default_rng(3)
for name, p in unet.parameters_and_names():
    if ".lora_B." in name:
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
step = out_dir / "checkpoint-100"
step.mkdir(parents=True, exist_ok=True)
ms.save_checkpoint(unet, str(step / "pytorch_model.ckpt"))
StableDiffusionXLPipeline.save_lora_weights(save_directory=str(out_dir),
                                            unet_lora_layers=get_peft_model_state_dict(unet),
                                            safe_serialization=True)
print("ok")
