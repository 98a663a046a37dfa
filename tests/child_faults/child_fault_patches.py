"""Port faults that only exist at real size (see sitecustomize.py in this folder)."""
from __future__ import annotations


def _truncate_middle() -> None:
    """The middle block's transformer stack runs one block short (an off-by-one in the depth loop);
    its weights and LoRA still load, so only the computation is wrong."""
    from lora_parity.backends.mindspore import unet as unet_mod

    init = unet_mod.UNetModel.__init__
    construct = unet_mod.SpatialTransformer.construct

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for name, cell in self.cells_and_names():
            if name == "middle_block.1":
                cell.fault_skip_last = True

    def patched_construct(self, x, context):
        if not getattr(self, "fault_skip_last", False):
            return construct(self, x, context)
        b, c, h, w = x.shape
        out = self.proj_in(self.norm(x).reshape(b, c, h * w).transpose(0, 2, 1))
        for block in list(self.transformer_blocks)[:-1]:
            out = block(out, context)
        return self.proj_out(out).transpose(0, 2, 1).reshape(b, c, h, w) + x

    unet_mod.UNetModel.__init__ = patched_init
    unet_mod.SpatialTransformer.construct = patched_construct


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
