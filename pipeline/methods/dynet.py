"""DyNet: coefficient-predicted dynamic kernels (Zhang, Zhang, Wang, Zhong, "DyNet: Dynamic
Convolution for Accelerating Convolutional Neural Networks", arXiv 2004.10694, 2020).

Every selected conv becomes a :class:`~pipeline.ops.dynamic_conv.DynamicConv2d`:
K kernels mixed per sample, ``W(x) = sum_k a_k(x) W_k``, with the coefficients
activated as in DyNet (linear), CondConv (sigmoid) or DY-Conv (softmax with a
temperature annealed linearly, 30 -> 1 over the first epochs). The K kernels
start from the dense kernel (plus small noise) and the coefficient branch so
that the converted model computes the dense function. With ``width < 1``
(DyNet's FLOPs-cut recipe: a narrower dynamic network recovers the accuracy
of the wider static one) the backbone is narrowed, initialised with the
leading channels of every dense layer and distilled from the dense model.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from pipeline.config import Config, Float, Int, Str, TemperatureCfg
from pipeline.claims import Claim, difference, ratio
from pipeline.methods.base import Method, MethodParams, distill_term, temperature_at
from pipeline.models.surgery import conv_names, narrowed, replace_module
from pipeline.ops.dynamic_conv import ACTIVATIONS, DynamicConv2d
from pipeline.train import Hooks

Layers = Literal["auto"] | Annotated[list[Str], Field(min_length=1)]


class DyNetParams(MethodParams):
    """``convert.dynet``: the kernel-dynamic conversion and its fine-tune."""

    layers: Layers  # "auto": every 3x3 conv but the stem; or fnmatch patterns of conv names
    num_kernels: Annotated[Int, Field(ge=1, le=64)]
    activation: Literal[ACTIVATIONS]  # type: ignore[valid-type]
    temperature: TemperatureCfg
    reduction: Annotated[Int, Field(ge=1, le=64)]  # coefficient branch hidden width = max(min_hidden, C_in / reduction)
    min_hidden: Annotated[Int, Field(ge=1, le=1024)]
    noise_std: Annotated[Float, Field(ge=0.0)]
    width: Annotated[Float, Field(gt=0.0, le=1.0)]


def dynamic_layers(model: nn.Module, layer_type: type[nn.Module] = DynamicConv2d) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, layer_type)]


class DyNet(Method):
    name = "dynet"
    label = "DyNet"
    paper = "Zhang et al., DyNet: Dynamic Convolution for Accelerating CNNs, arXiv 2004.10694 (2020)"
    counting = "its dynamic convs count the conv, the kernel aggregation and the coefficient branch"
    Params = DyNetParams
    layer_type: type[nn.Module] = DynamicConv2d  # the operator the selected convs become

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return dynamic_layers(model, self.layer_type)

    def backbone(self, model_cfg, p):
        return narrowed(model_cfg, p.width, f"convert.{self.name}.width")

    def width(self, p) -> float:
        return p.width

    def make_layer(self, conv: nn.Conv2d, p, generator: torch.Generator) -> nn.Module:
        """The dynamic conv that replaces ``conv``."""
        return DynamicConv2d.from_conv(conv, **self.layer_args(p, generator))

    @staticmethod
    def layer_args(p, generator: torch.Generator) -> dict:
        return dict(num_kernels=p.num_kernels, activation=p.activation, temperature=p.temperature.start,
                    reduction=p.reduction, min_hidden=p.min_hidden, noise_std=p.noise_std, generator=generator)

    def convert(self, model: nn.Module, p, seed: int) -> list[str]:
        gen = torch.Generator().manual_seed(seed)
        names = conv_names(model, p.layers, f"convert.{self.name}.layers")
        for name in names:
            replace_module(model, name, self.make_layer(model.get_submodule(name), p, gen))
        return names

    def restore(self, model: nn.Module, p) -> None:
        # The coefficient temperature is not a tensor: restore the one the last trained epoch used.
        t = temperature_at(p.temperature, p.train.epochs - 1)
        for _, m in self.layers(model):
            m.set_temperature(t)

    # ------------------------------------------------------------------ training
    def epoch_start(self, layers: list[DynamicConv2d], p, epoch: int) -> None:
        for m in layers:
            m.set_temperature(temperature_at(p.temperature, epoch))

    def extra_loss(self, layers: list[DynamicConv2d], p, teacher, inputs, logits) -> dict[str, torch.Tensor]:
        return distill_term(p.distill, teacher, inputs, logits)

    def epoch_metrics(self, layers: list[DynamicConv2d]) -> dict[str, float]:
        return {}

    def hooks(self, model, p, *, teacher=None, val_x=None) -> Hooks:
        layers = [m for _, m in self.layers(model)]
        return Hooks(
            lambda epoch: self.epoch_start(layers, p, epoch),
            lambda _model, inputs, logits, targets, progress: self.extra_loss(layers, p, teacher, inputs, logits),
            lambda _model: self.epoch_metrics(layers),
        )

    def measure(self, model, x, p):
        return {"converted_layers": len(self.layers(model)), "num_kernels": p.num_kernels,
                "softmax_coefficients": float(getattr(p, "activation", "softmax") == "softmax")}, {}

    # ------------------------------------------------------------------ transfer
    def transfer_params(self, p, cfg: Config):
        """The params of the transfer fine-tune: the temperature stays where the conversion ended."""
        end = p.temperature.end
        return p.model_copy(update={"temperature": TemperatureCfg(start=end, end=end, epochs=0)})

    def transfer_hooks(self, model, cfg: Config, record, val_x) -> Hooks:
        return self.hooks(model, self.transfer_params(self.params(cfg), cfg), teacher=None)

    # ------------------------------------------------------------------ report
    def claims(self) -> list[Claim]:
        me = self.stage
        return [
            Claim(self.name, "acc_vs_dense", PAPER, "abstract",
                  "A narrower dynamic network cuts the FLOPs of ResNet-18 by 67.2 % without loss of accuracy.",
                  "test accuracy, DyNet minus dense", "non_inferiority",
                  difference((me, "test_acc"), ("pretrain", "test_acc")), "dense", 100, " points"),
            Claim(self.name, "mac_ratio", PAPER, "abstract",
                  "DyNet at the accuracy of the static network needs 0.328 x its FLOPs (ResNet-18, -67.2 %).",
                  "MACs per image, DyNet / dense", "ratio_at_most",
                  ratio((me, "macs_per_image"), (me, "dense_macs_per_image")), "dense", 1, " x"),
            Claim(self.name, "acc_vs_static", PAPER, "Sec. 3 (the FLOPs-cut recipe)",
                  "The dynamic kernels recover the accuracy that narrowing the network costs.",
                  "test accuracy, DyNet minus the static network of its width (same init, distillation, epochs)",
                  "superiority", difference((me, "test_acc"), ("control@static", "test_acc")), "static control",
                  100, " points", control="static"),
        ]


PAPER = "Zhang et al., DyNet: Dynamic Convolution for Accelerating CNNs, arXiv 2004.10694 v2"
METHOD = DyNet()
