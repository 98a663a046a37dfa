"""Port faults that only exist at real size (see sitecustomize.py in this folder)."""
from __future__ import annotations


def _truncate_middle() -> None:
    """The middle block's transformer stack built one block short (an off-by-one in the depth loop)."""
    from lora_parity.backends.mindspore import unet as unet_mod

    init = unet_mod.UNetModel.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name, cell in self.cells_and_names():
            if name == "middle_block.1":
                del cell.transformer_blocks[len(cell.transformer_blocks) - 1]
        self.restamp_names() if hasattr(self, "restamp_names") else None

    unet_mod.UNetModel.__init__ = patched


def _drop_aesthetic() -> None:
    """The refiner's aesthetic score lost on the way to the conditioning vector (taken as 0)."""
    from lora_parity.backends.mindspore import unet as unet_mod

    vector = unet_mod.sdxl_vector

    def patched(*args, aesthetic_score=None, **kwargs):
        return vector(*args, aesthetic_score=None if aesthetic_score is None else 0.0, **kwargs)

    unet_mod.sdxl_vector = patched


FAULTS = {"truncate_middle": _truncate_middle, "drop_aesthetic": _drop_aesthetic}


def apply(name: str) -> None:
    FAULTS[name]()
