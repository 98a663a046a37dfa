"""Conversion: file -> reader -> key map -> writer, with no framework imported.

``layout`` (UNet / text-encoder layouts) and ``tiny`` (the built-in tiny SDXL's configs) say what
the model is; ``keymap`` / ``keys_table`` generate SGM <-> diffusers <-> kohya names from it;
``ckpt_io`` (MindSpore ``.ckpt`` protobuf), ``safetensors_io`` and ``tensor`` read and write files
without mindspore or torch; ``formats`` turns a file into named LoRA halves and back; ``lora_set``
resolves, validates and fuses; ``converter`` is the ``convert`` command; ``fullweights`` maps whole
base models the same way.
"""
