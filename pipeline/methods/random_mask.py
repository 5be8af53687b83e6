"""Control of DynConv: random masks at DynConv's executed fraction (each position executes by chance)."""

from __future__ import annotations

from pipeline.methods.dynconv import PAPER, MaskControl


class RandomMaskControl(MaskControl):
    name = "random_mask"
    label = "random masks (DynConv's fraction)"
    paper = "control of " + PAPER
    kind = "random"


METHOD = RandomMaskControl()
