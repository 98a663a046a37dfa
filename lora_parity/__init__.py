"""lora-parity: MindSpore <-> PyTorch SDXL LoRA conversion with layer-by-layer proof of parity."""

__version__ = "0.1.0"
