"""Control of DynConv: a fixed, evenly spread mask (ordered dither) at DynConv's executed fraction."""

from __future__ import annotations

from pipeline.methods.dynconv import PAPER, MaskControl


class UniformMaskControl(MaskControl):
    name = "uniform_mask"
    label = "uniform mask (DynConv's fraction)"
    paper = "control of " + PAPER
    kind = "uniform"


METHOD = UniformMaskControl()
