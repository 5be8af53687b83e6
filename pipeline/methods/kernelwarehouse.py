"""KernelWarehouse: dynamic convolution from warehouses of kernel cells shared across layers (Li & Yao,
"KernelWarehouse: Rethinking the Design of Dynamic Convolution", ICML 2024; official code
OSVAI/KernelWarehouse).

Every selected conv becomes a :class:`~pipeline.ops.kernel_warehouse.KWConv2d`: its kernel is cut into
cells, and each cell is an attention-weighted mixture of the cells of one warehouse shared by the convs of
its stage (``share: stage``: the convs whose names start with the same module, ``layerN`` of a CIFAR
ResNet) or kept per conv (``share: layer``: no cross-layer sharing, the ingredient's ablation). ``budget``
sets each warehouse's size: that many times the cells of the convs sharing it (the paper's 1/4 x to 4 x).
The conversion writes each conv's dense kernel into the cells it is assigned, so at the attention's
temperature 1 (the paper's temperature initialisation: each mixture on its own cell) the converted model
computes the dense one (budget >= 1), and starts the attention itself at that assignment, so the model
is the dense one at any temperature. The temperature then anneals linearly towards 0, where the learned
attention alone mixes the warehouse; the paper anneals over the first 10 of 300 epochs from scratch, a
fine-tune of a pretrained network needs the whole fine-tune for it (annealed over a quarter of it, the
network collapsed when the temperature reached 0). Fine-tuning follows DyNet's engine (conv selection, distillation,
schedule).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from pipeline.claims import Claim, RunMetrics, difference, metric, ratio, same
from pipeline.config import Float, Int, Section
from pipeline.errors import ConfigError
from pipeline.methods import dynet
from pipeline.methods.base import MethodParams
from pipeline.methods.dynet import DyNet, Layers
from pipeline.models.surgery import conv_names, replace_module
from pipeline.ops.kernel_warehouse import KWConv2d, convert_convs

PAPER = "Li & Yao, KernelWarehouse: Rethinking the Design of Dynamic Convolution, ICML 2024"


class Anneal(Section):
    """The attention's temperature ``tau``: linear from ``start`` to ``end`` over ``epochs`` (paper: 1 -> 0)."""

    start: Annotated[Float, Field(ge=0.0, le=1.0)]
    end: Annotated[Float, Field(ge=0.0, le=1.0)]
    epochs: Annotated[Int, Field(ge=0)]


class KernelWarehouseParams(MethodParams):
    """``convert.kernelwarehouse``: the warehouses, their attention and the fine-tune."""

    layers: Layers  # "auto": every 3x3 conv but the stem; or fnmatch patterns of conv names
    budget: Annotated[Float, Field(ge=0.0625, le=16.0)]  # warehouse cells / cells of the convs sharing it
    share: Literal["stage", "layer"]  # one warehouse per stage (the paper) or per conv (no sharing)
    temperature: Anneal
    reduction: Annotated[Float, Field(gt=0.0, le=1.0)]  # attention hidden width = max(min_hidden, C_in * reduction)
    min_hidden: Annotated[Int, Field(ge=1, le=1024)]
    noise_std: Annotated[Float, Field(ge=0.0)]  # Gaussian noise on the cells, x the dense weights' std
    width: Annotated[Float, Field(gt=0.0, le=1.0)]


class KernelWarehouse(DyNet):
    name = "kernelwarehouse"
    label = "KernelWarehouse"
    paper = PAPER
    counting = ("its convs count the conv, the assembly of each kernel from its warehouse (cells x warehouse "
                "size) and the attention branch")
    columns = {"warehouse cells": "warehouse_cells"}
    Params = KernelWarehouseParams
    layer_type = KWConv2d

    def convert(self, model, p, seed):
        gen = torch.Generator().manual_seed(seed)
        names = conv_names(model, p.layers, f"convert.{self.name}.layers")
        group = (lambda n: n.split(".")[0]) if p.share == "stage" else (lambda n: n)
        try:
            convert_convs(model, [(n, model.get_submodule(n)) for n in names], group, p.budget,
                          reduction=p.reduction, min_hidden=p.min_hidden, noise_std=p.noise_std, generator=gen,
                          replace=replace_module)
        except ValueError as err:
            raise ConfigError(f"convert.{self.name}: {err}") from None
        return names

    def measure(self, model, x, p):
        layers = [m for _, m in self.layers(model)]
        warehouses = {id(m.warehouse): m.warehouse for m in layers}
        return {"converted_layers": len(layers), "warehouses": len(warehouses),
                "warehouse_cells": float(sum(w.num_cells for w in warehouses.values())),
                "budget": p.budget, "shared": float(p.share == "stage")}, {}

    def transfer_params(self, p, cfg):
        """The transfer fine-tune keeps the temperature where the conversion ended."""
        end = p.temperature.end
        return p.model_copy(update={"temperature": Anneal(start=end, end=end, epochs=0)})

    def claims(self) -> list[Claim]:
        me, dyn = self.stage, dynet.METHOD.stage

        def paper_setting(r: RunMetrics) -> bool:  # the README's row: budget 1 x at the network's own width
            return metric(r, me, "budget") == 1.0 and metric(r, me, "width") == 1.0 and metric(r, me, "shared") == 1.0

        def same_as_dyconv(r: RunMetrics) -> bool:  # DyNet with softmax coefficients at the same width is DY-Conv
            return (metric(r, dyn, "softmax_coefficients") == 1.0 and metric(r, me, "budget") == 1.0
                    and same(r, me, dyn, ("width",)))

        as_dyconv = "budget 1 x; DyNet with softmax coefficients at the same width"
        return [
            Claim(self.name, "acc_vs_dense", PAPER, "official README (ImageNet, 300 epochs)",
                  "KernelWarehouse (1 x) raises ResNet-18's top-1 accuracy from 70.44 % to 74.77 %.",
                  "test accuracy, KernelWarehouse minus dense", "superiority",
                  difference((me, "test_acc"), ("pretrain", "test_acc")), "dense", 100, " points",
                  comparable=paper_setting, condition="budget 1 x at width 1, warehouses shared per stage"),
            Claim(self.name, "acc_vs_dyconv", PAPER, "abstract; Table 1 (numbers unconfirmed)",
                  "KernelWarehouse (1 x) is more accurate than dynamic convolution with a few whole kernels "
                  "(DY-Conv) on the same backbone.",
                  "test accuracy, KernelWarehouse minus DyNet with softmax coefficients", "superiority",
                  difference((me, "test_acc"), (dyn, "test_acc")), "DyNet (DY-Conv)", 100, " points",
                  comparable=same_as_dyconv, condition=as_dyconv),
            Claim(self.name, "acc_vs_unshared", PAPER, "Sec. 3 (warehouse sharing)",
                  "Sharing one warehouse across the convs of a stage beats the same budget kept per conv.",
                  "test accuracy, KernelWarehouse minus its unshared control (same budget, recipe, epochs)",
                  "superiority", difference((me, "test_acc"), ("control@unshared_warehouse", "test_acc")),
                  "unshared control", 100, " points", control="unshared_warehouse"),
            Claim(self.name, "params_vs_dyconv", PAPER, "official README (introduction)",
                  "Dynamic convolution with n kernels multiplies a conv's parameters by n; KernelWarehouse at 1 x "
                  "is parameter-efficient: fewer parameters than DY-Conv.",
                  "parameters, KernelWarehouse / DyNet with softmax coefficients", "ratio_at_most",
                  ratio((me, "params"), (dyn, "params")), "DyNet (DY-Conv)", 1, " x",
                  comparable=same_as_dyconv, condition=as_dyconv),
        ]


METHOD = KernelWarehouse()
