"""Run in the interpreter that has mindone: save an SD3 LoRA the way mindone.diffusers' SD3 trainer does.

``train_dreambooth_lora_sd3.py``: ``transformer.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights=
"gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``, then
``StableDiffusion3Pipeline.save_lora_weights(transformer_lora_layers=get_peft_model_state_dict(transformer))``.
lora_B gets random values (a trained LoRA; gaussian init leaves it zero).  On CPU the transformer's
sincos position grid needs the compat layer (mint.arange), applied before mindone builds anything.

usage: python save_trained_sd3_lora.py PIPELINE_DIR OUT_DIR RANK [VARIANT]
"""
import sys
from pathlib import Path

import mindspore as ms
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lora_parity.backends.mindone.compat import apply_cpu_compat  # noqa: E402  (the transformer's init needs it)

apply_cpu_compat("CPU")
from mindone.diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from mindone.peft import LoraConfig
from mindone.peft.utils import get_peft_model_state_dict

base, out_dir, rank = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
variant = sys.argv[4] if len(sys.argv) > 4 else None
tr = SD3Transformer2DModel.from_pretrained(str(base), subfolder="transformer", variant=variant, local_files_only=True)
tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                          target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
rng = np.random.default_rng(5)
for name, p in tr.parameters_and_names():
    if ".lora_B." in name:
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
out_dir.mkdir(parents=True, exist_ok=True)
StableDiffusion3Pipeline.save_lora_weights(save_directory=str(out_dir),
                                           transformer_lora_layers=get_peft_model_state_dict(tr),
                                           safe_serialization=True)
print("ok")
