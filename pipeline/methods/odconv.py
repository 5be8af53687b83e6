"""ODConv: omni-dimensional dynamic convolution (Li, Zhou, Yao, "Omni-Dimensional Dynamic
Convolution", ICLR 2022; official code OSVAI/ODConv).

Every selected conv becomes an :class:`~pipeline.ops.odconv.ODConv2d`: n
kernels and four attentions (spatial, input channel, output filter, kernel)
from one squeeze branch, all divided by a temperature annealed linearly (the
official recipe: 30 -> 1 over the first epochs). The conversion follows DyNet's
(same conv selection, narrowing, distillation and schedule), so ODConv and
DyNet compare at the same K and width: the paper's question, whether attending
over all four dimensions of the kernel space beats attending over the kernels
alone (DY-Conv, DyNet's softmax coefficients).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config import Float, Int, TemperatureCfg
from pipeline.methods import dynet
from pipeline.methods.base import MethodParams, verdict
from pipeline.methods.dynet import DyNet, Layers
from pipeline.ops.odconv import ATTENTIONS, ODConv2d


class ODConvParams(MethodParams):
    """``convert.odconv``: the omni-dimensional conversion and its fine-tune."""

    layers: Layers  # "auto": every 3x3 conv but the stem; or fnmatch patterns of conv names
    num_kernels: Annotated[Int, Field(ge=1, le=64)]  # n
    attentions: Annotated[list[Literal[ATTENTIONS]], Field(min_length=1)]  # type: ignore[valid-type]
    temperature: TemperatureCfg
    reduction: Annotated[Float, Field(gt=0.0, le=1.0)]  # attention hidden width = max(min_hidden, C_in * reduction)
    min_hidden: Annotated[Int, Field(ge=1, le=1024)]
    noise_std: Annotated[Float, Field(ge=0.0)]
    width: Annotated[Float, Field(gt=0.0, le=1.0)]

    @model_validator(mode="after")
    def _kernel_attention(self) -> "ODConvParams":
        if self.num_kernels > 1 and "kernel" not in self.attentions:
            raise ValueError("attentions: the kernel attention mixes the n kernels; keep it when num_kernels > 1")
        if len(set(self.attentions)) != len(self.attentions):
            raise ValueError(f"attentions: each at most once, got {self.attentions}")
        return self


class ODConv(DyNet):
    name = "odconv"
    label = "ODConv"
    paper = "Li, Zhou, Yao, Omni-Dimensional Dynamic Convolution, ICLR 2022"
    Params = ODConvParams
    layer_type = ODConv2d

    def make_layer(self, conv, p, generator):
        return ODConv2d.from_conv(conv, noise_std=p.noise_std, generator=generator, num_kernels=p.num_kernels,
                                  reduction=p.reduction, min_hidden=p.min_hidden, temperature=p.temperature.start,
                                  attentions=p.attentions)

    def claims(self, converted, cfg):
        o, d = converted.get(self.name), converted.get(dynet.METHOD.name)
        if o is None:
            return []
        rows = [{"claim": f"{self.label} at width {o['width']:g}: test accuracy within 1.5 points of the full-width "
                          "dense model",
                 "measured": f"{-100 * o['acc_drop']:+.2f} points vs dense at {o['mac_ratio']:.3f} x its MACs",
                 "verdict": verdict(o["acc_drop"] <= 0.015)}]
        if d is not None:
            op, dp = self.params(cfg), dynet.METHOD.params(cfg)
            same = (o["width"] == d["width"] and op.num_kernels == dp.num_kernels
                    and dp.activation == "softmax")  # DyNet's softmax coefficients are DY-Conv
            note = "" if same else " (not at the same n, width and softmax kernels: not comparable)"
            rows.append({
                "claim": "ODConv: test accuracy at least that of kernel-only attention (DY-Conv) at the same n",
                "measured": f"{100 * (o['test_acc'] - d['test_acc']):+.2f} points vs DyNet{note}",
                "verdict": verdict(same and o["test_acc"] >= d["test_acc"]),
            })
        return rows


METHOD = ODConv()
