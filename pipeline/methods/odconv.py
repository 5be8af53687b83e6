"""ODConv: omni-dimensional dynamic convolution (Li, Zhou, Yao, "Omni-Dimensional Dynamic
Convolution", ICLR 2022; official code OSVAI/ODConv).

Every selected conv becomes an :class:`~pipeline.ops.odconv.ODConv2d`: n
kernels and four attentions (spatial, input channel, output filter, kernel)
from one squeeze branch, all divided by a temperature annealed linearly (the
official recipe: 30 -> 1 over the first epochs; over half of the default 8
epochs here: annealed over 2, the attentions jump when the temperature
reaches 1 and fine-tuning diverged). The conversion follows DyNet's
(same conv selection, narrowing, distillation and schedule), so ODConv and
DyNet compare at the same K and width: the paper's question, whether attending
over all four dimensions of the kernel space beats attending over the kernels
alone (DY-Conv, DyNet's softmax coefficients).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from pipeline.config import Float, Int, TemperatureCfg
from pipeline.methods import dynet
from pipeline.claims import Claim, RunMetrics, difference, metric, same
from pipeline.methods.base import MethodParams
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
    counting = ("the conv, the kernel and spatial mixing, the input and output scaling and the four-headed "
                "attention branch")
    Params = ODConvParams
    layer_type = ODConv2d

    def convert(self, model, p, seed):
        """DyNet's conversion, then the BatchNorm after each ODConv (``bnN`` beside ``convN``) takes the
        operator's start scale into its running statistics: the converted model starts as the dense one."""
        names = super().convert(model, p, seed)
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            bn = getattr(owner, child.replace("conv", "bn", 1), None)
            if isinstance(bn, torch.nn.BatchNorm2d):
                owner.get_submodule(child).rescale_following_bn(bn)
        return names

    def make_layer(self, conv, p, generator):
        return ODConv2d.from_conv(conv, noise_std=p.noise_std, generator=generator, num_kernels=p.num_kernels,
                                  reduction=p.reduction, min_hidden=p.min_hidden, temperature=p.temperature.start,
                                  attentions=p.attentions)

    def claims(self) -> list[Claim]:
        me, dyn = self.stage, dynet.METHOD.stage

        def same_as_dycov(r: RunMetrics) -> bool:  # DyNet with softmax coefficients at the same n and width is DY-Conv
            return metric(r, dyn, "softmax_coefficients") == 1.0 and same(r, me, dyn, ("num_kernels", "width"))

        return [
            Claim(self.name, "acc_vs_dyconv", PAPER, "abstract; Table 1 (numbers unconfirmed)",
                  "Attending over all four dimensions of the kernel space beats kernel-only attention (DY-Conv) "
                  "at the same number of kernels.",
                  "test accuracy, ODConv minus DyNet with softmax coefficients", "superiority",
                  difference((me, "test_acc"), (dyn, "test_acc")), "DyNet (DY-Conv)", 100, " points",
                  comparable=same_as_dycov, condition="DyNet with softmax coefficients at the same n and width"),
            Claim(self.name, "acc_vs_dense", PAPER, "official README (ResNet-18: 70.25 % -> 74.19 % with 4 kernels)",
                  "ODConv improves the accuracy of the static network it replaces (same width).",
                  "test accuracy, ODConv minus dense", "superiority",
                  difference((me, "test_acc"), ("pretrain", "test_acc")), "dense", 100, " points",
                  comparable=lambda r: metric(r, me, "width") == 1.0, condition="ODConv at width 1"),
        ]


PAPER = "Li, Zhou, Yao, Omni-Dimensional Dynamic Convolution, ICLR 2022"
METHOD = ODConv()
