"""Control of DyNet: the static network of DyNet's width, trained by DyNet's recipe without dynamic kernels.

DyNet's FLOPs cut comes from a narrower network whose dynamic kernels are to
recover the accuracy of the wider static one (Zhang et al., arXiv 2004.10694,
Sec. 3). Whether the kernels are what recovers it is judged against this
control: the same narrowed backbone, initialised from the same leading
channels of the dense model, distilled from it the same way for the same
epochs, with ordinary convs. Its params are ``convert.dynet``'s ``width``,
``distill`` and ``train``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pipeline.config import Float
from pipeline.methods import dynet
from pipeline.methods.base import Method, MethodParams, distill_term
from pipeline.models.surgery import narrowed
from pipeline.train import Hooks


class StaticParams(MethodParams):
    width: Annotated[Float, Field(gt=0.0, le=1.0)]


class Static(Method):
    name = "static"
    label = "static (DyNet's width)"
    paper = "control of " + dynet.PAPER
    Params = StaticParams
    control_of = dynet.METHOD.name

    def backbone(self, model_cfg, p):
        return narrowed(model_cfg, p.width, f"convert.{self.control_of}.width")

    def width(self, p) -> float:
        return p.width

    def convert(self, model, p, seed):
        return []

    def hooks(self, model, p, *, teacher=None, val_x=None) -> Hooks:
        return Hooks(extra_loss=lambda _m, inputs, logits, targets, progress: distill_term(p.distill, teacher, inputs,
                                                                                           logits))

    def latency_variants(self):
        return []


METHOD = Static()
