"""SD-Conv: sparse dynamic convolution (He, Jiang, Dong, Ding, "SD-Conv: Towards the
Parameter-Efficiency of Dynamic Convolution", arXiv 2204.02227, WACV 2023).

DyNet's dynamic convs (same K and width) whose static kernels are masked by
learnable thresholds, ``M_k = step(|W_k| - t)`` as in Dynamic Sparse Training
(Liu et al., ICLR 2020, Eq. 3-4), with the regulariser
``reg_weight * sum exp(-t)`` (Eq. 7) pushing the thresholds up; a layer whose
keep ratio falls below ``min_keep`` resets its thresholds to 0 at the start of
an epoch. The thresholds start at the ``init_sparsity`` quantile of |W| in
their group. The model file stores each pruned kernel tensor as a sparse
tensor holding only the kept weights.

Search: one target sparsity per stage (the converted layers that share an
output resolution): a trial re-initialises each layer's thresholds at that
quantile of |W| within each threshold group (pruned weights are 0 and stay 0,
so targets below the converted model's sparsity leave a layer as it is), then
learns them under a sampled regulariser weight. Transfer: masks frozen by
default (``convert.sdconv.freeze_masks``): the sparse model is what transfers.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.config import Bool, Config, Float, RangeCfg, SearchCommon, Section, TemperatureCfg
from pipeline.methods import dynet
from pipeline.claims import Claim, RunMetrics, difference, ratio, same
from pipeline.methods.base import SearchSpace, temperature_at
from pipeline.methods.dynet import DyNet, DyNetParams, dynamic_layers
from pipeline.ops.sd_conv import ESTIMATORS, GRANULARITIES, SDConv2d


class SDConvParams(DyNetParams):
    """``convert.sdconv``: DyNet's keys plus the learnable-threshold masks."""

    granularity: Literal[GRANULARITIES]  # type: ignore[valid-type]
    threshold_init: Annotated[Float, Field(ge=0.0)]
    init_sparsity: Annotated[Float, Field(ge=0.0, lt=1.0)] | None  # null or 0: thresholds start at threshold_init
    estimator: Literal[ESTIMATORS]  # type: ignore[valid-type]
    reg_weight: Annotated[Float, Field(ge=0.0)]
    min_keep: Annotated[Float, Field(ge=0.0, lt=1.0)]
    freeze_masks: Bool  # transfer@sdconv: kept weights stay the kept ones


class SDConvSpace(Section):
    """Thresholds start at a per-stage target sparsity, then learn under the regulariser."""

    stage_sparsity: RangeCfg
    reg_weight: RangeCfg

    @model_validator(mode="after")
    def _fractions(self) -> "SDConvSpace":
        if not (0 <= self.stage_sparsity.low and self.stage_sparsity.high < 1):
            raise ValueError("stage_sparsity: must lie in [0, 1)")
        if self.reg_weight.low < 0:
            raise ValueError("reg_weight: must be >= 0")
        return self


class SDConvSearchParams(SearchCommon):
    space: SDConvSpace


@torch.no_grad()
def init_thresholds(layer: SDConv2d, sparsity: float) -> None:
    """Set an SD-Conv layer's thresholds to the ``sparsity`` quantile of |W| within each threshold group."""
    w = layer.weight.abs()
    t = layer.threshold
    # Every threshold covers the weight entries that broadcast onto it: reduce over the size-1 axes of t.
    dims = [d for d in range(w.dim()) if t.shape[d] == 1]
    moved = w.permute(*[d for d in range(w.dim()) if d not in dims], *dims)
    flat = moved.reshape(*[w.shape[d] for d in range(w.dim()) if d not in dims], -1)
    q = torch.quantile(flat, sparsity, dim=-1, keepdim=True)
    t.copy_(q.reshape(t.shape))


def kernel_sparsity(layers: list[SDConv2d]) -> float:
    """Fraction of SD-Conv kernel weights pruned, over all layers."""
    kept = sum(m.keep_ratio() * m.weight.numel() for m in layers)
    return 1.0 - kept / sum(m.weight.numel() for m in layers)


@torch.no_grad()
def freeze_masks(model: nn.Module) -> int:
    """Zero the pruned weights, set thresholds to 0 and stop training them; returns the kept weights."""
    kept = 0
    for _, m in dynamic_layers(model):
        mask = m.weight.abs() > m.threshold
        m.weight.mul_(mask)
        m.threshold.zero_()
        m.threshold.requires_grad_(False)
        kept += int(mask.sum())
    return kept


def kept_weights(model: nn.Module) -> int:
    return sum(int((m.weight.abs() > m.threshold).sum()) for _, m in dynamic_layers(model))


class SDConvSearch(SearchSpace):
    Params = SDConvSearchParams
    objectives = ("val_acc", "macs_per_image", "nonzero_params")
    select_cost = "nonzero_params"
    searches = "threshold"

    def modules(self, model):
        return dynamic_layers(model)

    def suggest(self, trial, n_stages, space):
        params = {f"sparsity_stage{i}": self.draw(trial, f"sparsity_stage{i}", space.stage_sparsity)
                  for i in range(n_stages)}
        params["reg_weight"] = self.draw(trial, "reg_weight", space.reg_weight)
        return params

    def apply(self, model, sample, stages, p, sp, *, teacher, val_x):
        for (_, m), stage in zip(self.modules(model), stages):
            init_thresholds(m, sample[f"sparsity_stage{stage}"])
        end = p.temperature.end  # the converted model was trained down to this temperature
        p = p.model_copy(update={"reg_weight": sample["reg_weight"],
                                 "temperature": TemperatureCfg(start=end, end=end, epochs=0)})
        return METHOD.hooks(model, p, teacher=teacher)


class SDConv(DyNet):
    name = "sdconv"
    label = "SD-Conv"
    paper = "He et al., SD-Conv: Towards the Parameter-Efficiency of Dynamic Convolution, WACV 2023 (arXiv 2204.02227)"
    Params = SDConvParams
    search = SDConvSearch()
    columns = {"kernel sparsity": "kernel_sparsity"}
    counting = "as DyNet's, with only the kept weights of each kernel"

    def make_layer(self, conv, p, generator):
        layer = SDConv2d.from_conv(conv, granularity=p.granularity, threshold_init=p.threshold_init,
                                   estimator=p.estimator, **self.layer_args(p, generator))
        if p.init_sparsity:
            init_thresholds(layer, p.init_sparsity)
        return layer

    # ------------------------------------------------------------------ model file
    def pack(self, model):
        """State dict with every kernel tensor replaced by its pruned export (a sparse tensor holding only
        the kept weights); thresholds stay, so the masks reload exactly."""
        state = model.state_dict()
        pruned = {}
        for name, m in dynamic_layers(model):
            pruned[name] = m.export_pruned()["kernels"]
            del state[f"{name}.weight"]
        return state, pruned

    def unpack(self, state, extra):
        state = dict(state)
        for name, kernels in extra.items():
            state[f"{name}.weight"] = kernels.to_dense()
        return state

    # ------------------------------------------------------------------ training
    def epoch_start(self, layers, p, epoch):
        for m in layers:
            m.set_temperature(temperature_at(p.temperature, epoch))
            m.reset_collapsed(p.min_keep)

    def extra_loss(self, layers, p, teacher, inputs, logits):
        out = super().extra_loss(layers, p, teacher, inputs, logits)
        if p.reg_weight > 0:
            out["threshold_reg"] = p.reg_weight * sum(m.regularization() for m in layers)
        return out

    def epoch_metrics(self, layers):
        return {"kernel_sparsity": kernel_sparsity(layers)}

    def measure(self, model, x, p):
        metrics, layers = super().measure(model, x, p)
        dyn = dynamic_layers(model)
        metrics["kernel_sparsity"] = kernel_sparsity([m for _, m in dyn])
        layers["kernel_sparsity"] = {n: m.kernel_sparsity() for n, m in dyn}
        return metrics, layers

    # ------------------------------------------------------------------ transfer
    def transfer_params(self, p, cfg):
        p = p.model_copy(update={"reg_weight": 0.0, "min_keep": 0.0})
        return super().transfer_params(p, cfg)

    def transfer_setup(self, model, cfg: Config):
        """With ``convert.sdconv.freeze_masks``: pruned weights set to exactly 0, thresholds to 0 and not trained,
        so mask = [|W| > 0] and a pruned weight's gradient is 0."""
        return {"kept_weights_before": freeze_masks(model)} if self.params(cfg).freeze_masks else {}

    def transfer_note(self, cfg: Config) -> str:
        return f"{self.label} masks {'frozen' if self.params(cfg).freeze_masks else 'free to change'}."

    def transfer_metrics(self, model, x, before):
        if "kept_weights_before" not in before:
            return {}
        after = kept_weights(model)
        if after > before["kept_weights_before"]:
            raise RuntimeError("SD-Conv masks were frozen but gained weights during transfer")
        return {**before, "kept_weights_after": after}

    # ------------------------------------------------------------------ report
    def claims(self) -> list[Claim]:
        me, dyn = self.stage, dynet.METHOD.stage

        def same_backbone(r: RunMetrics) -> bool:  # comparable with DyNet: same K and width
            return same(r, me, dyn, ("num_kernels", "width"))

        return [
            Claim(self.name, "params_vs_dynet", PAPER, "abstract (tables unconfirmed)",
                  "Sparse dynamic kernels need fewer parameters than dynamic convolution (DY-Conv) at the same K.",
                  "nonzero parameters, SD-Conv / DyNet", "ratio_at_most",
                  ratio((me, "nonzero_params"), (dyn, "nonzero_params")), "DyNet", 1, " x",
                  comparable=same_backbone, condition="SD-Conv and DyNet at the same K and width"),
            Claim(self.name, "acc_vs_dynet", PAPER, "abstract (tables unconfirmed)",
                  "With fewer parameters SD-Conv is at least as accurate as DY-Conv.",
                  "test accuracy, SD-Conv minus DyNet", "non_inferiority",
                  difference((me, "test_acc"), (dyn, "test_acc")), "DyNet", 100, " points",
                  comparable=same_backbone, condition="SD-Conv and DyNet at the same K and width"),
            Claim(self.name, "acc_vs_magnitude", PAPER, "Sec. 3 (learnable thresholds)",
                  "Learned thresholds find better masks than pruning the dynamic kernels by magnitude.",
                  "test accuracy, SD-Conv minus DyNet pruned by |W| to SD-Conv's sparsity (same fine-tuning)",
                  "superiority", difference((me, "test_acc"), ("control@magnitude", "test_acc")),
                  "magnitude control", 100, " points", control="magnitude"),
            Claim(self.name, "transfer_vs_dynet", PAPER, "abstract (tables unconfirmed)",
                  "SD-Conv's pretrained models transfer better to downstream tasks.",
                  "downstream test accuracy, SD-Conv minus DyNet (both transferred from their converted models)",
                  "superiority", difference((f"transfer@{self.name}", "test_acc"), (f"transfer@{dynet.METHOD.name}", "test_acc")),
                  "DyNet", 100, " points"),
        ]


PAPER = "He et al., SD-Conv: Towards the Parameter-Efficiency of Dynamic Convolution, WACV 2023"
METHOD = SDConv()
