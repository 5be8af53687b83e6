"""DynConv: spatially sparse residual blocks (Verelst & Tuytelaars, "Dynamic Convolutions:
Exploiting Spatial Sparsity for Faster Inference", CVPR 2020).

Every residual block (ResNet basic blocks; MobileNetV2 blocks with an
identity shortcut) gets a mask unit that decides per position whether the
residual branch runs (:mod:`pipeline.ops.spatial_gate`); it starts open, so
the converted model starts as the dense one. Training: Gumbel noise and a
straight-through hard mask, the sparsity criterion (network term + per-block
bounds annealed with cos^2) towards ``budget``, Gumbel noise off for the last
``noise_off_fraction`` of the epochs, distillation from the dense model.
Inference: the blocks run by gather / scatter (:mod:`pipeline.ops.sparse_exec`).

By default training follows the official code (thomasverelst/dynconv,
classification): the dilated mask carries no gradient (``dynconv/maskunit.py``
``ExpandMask``), the branch's convs read unmasked inputs and the mask is
applied where the residual is added (``models/resnet_util.py``), the per-block
bounds are annealed once per epoch (``dynconv/loss.py``: ``p = epoch / (0.33 E)``)
and Gumbel noise is off for epochs ``e > (1 - noise_off_fraction) E``
(``main_cifar.py``: ``epoch > 0.8 * epochs``; params.yaml uses 0.34 rather
than 0.2 for the 6-epoch default, see its comment). Each of the project's
earlier choices is a param (``dilated_mask_grad``, ``mask_conv2_input``,
``anneal_per: step``) so an ablation can compare them.

Search: the network budget, per-stage offsets from it (an extra per-stage
budget term in the loss) and the Gumbel temperature.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.config import Bool, Config, Float, PosFloat, RangeCfg, SearchCommon, Section
from pipeline.errors import ConfigError, UserError
from pipeline.claims import Claim, difference, value
from pipeline.methods import get
from pipeline.methods.base import Method, MethodParams, SearchSpace, Variant, distill_term
from pipeline.models.cifar_mobilenetv2 import InvertedResidual
from pipeline.models.cifar_resnet import BasicBlock
from pipeline.models.surgery import replace_module
from pipeline.ops.gated_resnet import gated_type
from pipeline.ops.fixed_masks import RandomMask, UniformMask, density_for_fraction
from pipeline.ops.sparse_exec import to_sparse_execution
from pipeline.ops.spatial_gate import BudgetLoss, GatedBasicBlock, GatedInvertedResidual, gated_blocks, set_gumbel
from pipeline.train import Hooks



class DynConvParams(MethodParams):
    """``convert.dynconv``: gated blocks and their sparsity criterion."""

    budget: Annotated[Float, Field(gt=0.0, le=1.0)]
    gumbel_temperature: PosFloat
    noise_off_fraction: Annotated[Float, Field(ge=0.0, le=1.0)]  # no noise for epochs e > (1 - this) * epochs
    budget_weight: Annotated[Float, Field(ge=0.0)]
    anneal_fraction: Annotated[Float, Field(gt=0.0, le=1.0)]
    anneal_per: Literal["epoch", "step"]  # epoch: the official schedule; step: bounds move every step
    dilated_mask_grad: Bool  # false: the official boolean dilated mask; true: gradient through the dilation
    mask_conv2_input: Bool  # false: official, mask where the residual is added; true: conv2 reads masked input
    open_bias: Float


class DynConvSpace(Section):
    """Network budget, per-stage offsets from it, Gumbel temperature."""

    budget: RangeCfg
    stage_offset: RangeCfg
    gumbel_temperature: RangeCfg

    @model_validator(mode="after")
    def _fractions(self) -> "DynConvSpace":
        if not (0 < self.budget.low and self.budget.high <= 1):
            raise ValueError("budget: must lie in (0, 1]")
        if self.gumbel_temperature.low <= 0:
            raise ValueError("gumbel_temperature: must be > 0")
        return self


class DynConvSearchParams(SearchCommon):
    space: DynConvSpace
    min_stage_budget: Annotated[Float, Field(gt=0.0, le=1.0)]  # a stage's budget is clipped to [this, 1]


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = set(gated_blocks(model))
    return [(n, m) for n, m in model.named_modules() if m in blocks]


@torch.no_grad()
def block_fractions(model: nn.Module, inputs: torch.Tensor, batch_size: int = 500) -> tuple[list[float], float]:
    """Eval-mode executed fraction of every gated block and of the whole gated part (cost-weighted)."""
    was = model.training
    model.eval()
    blocks = gated_blocks(model)
    executed = torch.zeros(len(blocks), dtype=torch.float64)
    dense = torch.zeros(len(blocks), dtype=torch.float64)
    for chunk in inputs.split(batch_size):
        model(chunk)
        for i, b in enumerate(blocks):
            executed[i] += b.executed_cost().sum().double()
            dense[i] += float(b.dense_cost_per_image) * len(chunk)
    model.train(was)
    return (executed / dense).tolist(), float(executed.sum() / dense.sum())


@torch.no_grad()
def image_fractions(model: nn.Module, inputs: torch.Tensor, batch_size: int = 500) -> list[float]:
    """Eval-mode executed fraction of the gated part per image (cost-weighted over blocks); their mean is
    :func:`block_fractions`' overall fraction (every image has the same dense cost)."""
    was = model.training
    model.eval()
    blocks = gated_blocks(model)
    dense = sum(float(b.dense_cost_per_image) for b in blocks)
    out: list[float] = []
    for chunk in inputs.split(batch_size):
        model(chunk)
        executed = sum(b.executed_cost().double() for b in blocks)
        out += (executed / dense).tolist()
    model.train(was)
    return out


def gumbel_noise(epoch: int, epochs: int, noise_off_fraction: float) -> bool:
    """Whether epoch ``epoch`` (0-based) trains with Gumbel noise: off for ``epoch > (1 - f) * epochs``
    (the official ``main_cifar.py``: ``epoch > 0.8 * epochs`` with f = 0.2)."""
    return not epoch > (1.0 - noise_off_fraction) * epochs


def stage_budgets(sample: dict[str, float], n_stages: int, floor: float) -> list[float]:
    return [min(1.0, max(floor, sample["budget"] + sample[f"offset_stage{i}"])) for i in range(n_stages)]


class DynConvSearch(SearchSpace):
    Params = DynConvSearchParams
    objectives = ("val_acc", "macs_per_image")
    select_cost = "macs_per_image"
    searches = "budget"

    def modules(self, model):
        return named_blocks(model)

    def suggest(self, trial, n_stages, space):
        params = {"budget": self.draw(trial, "budget", space.budget)}
        params.update({f"offset_stage{i}": self.draw(trial, f"offset_stage{i}", space.stage_offset)
                       for i in range(n_stages)})
        params["gumbel_temperature"] = self.draw(trial, "gumbel_temperature", space.gumbel_temperature)
        return params

    def apply(self, model, sample, stages, p, sp, *, teacher, val_x):
        p = p.model_copy(update={"budget": sample["budget"], "gumbel_temperature": sample["gumbel_temperature"]})
        budgets = stage_budgets(sample, max(stages) + 1, sp.min_stage_budget)
        return METHOD.gate_hooks(model, p, sp.train.epochs, teacher, val_x, [budgets[s] for s in stages])

    def final_params(self, p, sample):
        return p.model_copy(update={"budget": sample["budget"]})


PAPER = "Verelst & Tuytelaars, Dynamic Convolutions: Exploiting Spatial Sparsity for Faster Inference, CVPR 2020"


class DynConv(Method):
    name = "dynconv"
    label = "DynConv"
    paper = "Verelst & Tuytelaars, Dynamic Convolutions: Exploiting Spatial Sparsity for Faster Inference, CVPR 2020"
    Params = DynConvParams
    search = DynConvSearch()
    columns = {"executed fraction": "executed_fraction"}
    counting = ("its gated blocks count the mask unit and the positions that executed (the dilated mask's for "
                "the first conv)")

    def convert(self, model, p, seed):
        names = []
        for name, block in list(model.named_modules()):
            if type(block) is BasicBlock:
                gated = GatedBasicBlock.from_block(block, open_bias=p.open_bias)
            elif type(block) is InvertedResidual and block.use_res:
                gated = GatedInvertedResidual.from_block(block, open_bias=p.open_bias)
            elif gated_type(block) is not None:  # torchvision ResNets: every block, strided ones too
                gated = gated_type(block).from_block(block, open_bias=p.open_bias)
            else:
                continue
            gated.dilated_mask_grad, gated.mask_conv2_input = p.dilated_mask_grad, p.mask_conv2_input
            replace_module(model, name, gated)
            names.append(name)
        if not names:
            raise ConfigError(f"convert.{self.name}: the backbone has no residual block to gate "
                              "(use cifar_resnet, cifar_mobilenetv2, resnet18, resnet50 or resnet101)")
        set_gumbel(model, temperature=p.gumbel_temperature, noise=True)
        return names

    # ------------------------------------------------------------------ training
    def gate_hooks(self, model, p, epochs: int, teacher, val_x, block_budgets: list[float] | None = None) -> Hooks:
        """Budget loss (bounds annealed per ``p.anneal_per``), the Gumbel noise switch, distillation, and
        the validation executed fraction per epoch."""
        criterion = BudgetLoss(p.budget, p.budget_weight, p.anneal_fraction, block_budgets)
        blocks = gated_blocks(model)
        current = {"epoch": 0}

        def epoch_start(epoch: int) -> None:
            current["epoch"] = epoch
            set_gumbel(model, temperature=p.gumbel_temperature, noise=gumbel_noise(epoch, epochs, p.noise_off_fraction))

        def extra_loss(_model, inputs, logits, targets, progress):
            anneal = current["epoch"] / epochs if p.anneal_per == "epoch" else progress
            return {**criterion(blocks, anneal), **distill_term(p.distill, teacher, inputs, logits)}

        def epoch_metrics(_model):
            return {"executed_fraction": block_fractions(model, val_x)[1]}

        return Hooks(epoch_start, extra_loss, epoch_metrics)

    def hooks(self, model, p, *, teacher=None, val_x=None):
        return self.gate_hooks(model, p, p.train.epochs, teacher, val_x)

    def measure(self, model, x, p):
        per_block, overall = block_fractions(model, x)
        names = [n for n, _ in named_blocks(model)]
        metrics = {"executed_fraction": overall, "budget": p.budget, "budget_gap": abs(overall - p.budget)}
        return metrics, {"executed_fraction": dict(zip(names, per_block))}

    def per_image(self, model, x, p):
        return {"executed_fraction": image_fractions(model, x)}

    # ------------------------------------------------------------------ transfer
    def transfer_hooks(self, model, cfg: Config, record, val_x):
        """The gates keep training under the budget loss, at the budget the source was trained for."""
        p = self.params(cfg)
        budget = record.get("meta", {}).get("search_params", {}).get("budget", p.budget)
        p = p.model_copy(update={"budget": budget, "distill": p.distill.model_copy(update={"weight": 0.0})})
        return self.gate_hooks(model, p, cfg.transfer.train.epochs, None, val_x)

    def transfer_metrics(self, model, x, before):
        return {"executed_fraction": block_fractions(model, x)[1]}

    # ------------------------------------------------------------------ latency
    def latency_variants(self):
        return [
            Variant(f"{self.name}_masked", self.model_file, self.stage),
            Variant(f"{self.name}_sparse", self.model_file, self.stage, to_sparse_execution),
            Variant(f"{self.name}_searched_sparse", self.searched_file, f"search@{self.name}", to_sparse_execution),
        ]

    # ------------------------------------------------------------------ report
    def recipe(self, p) -> str:
        variants = [name for name, on in (("dilated_mask_grad", p.dilated_mask_grad),
                                          ("mask_conv2_input", p.mask_conv2_input),
                                          ("anneal_per: step", p.anneal_per == "step")) if on]
        noise = f"Gumbel noise off for epochs > {1 - p.noise_off_fraction:g} x epochs"
        if not variants:
            return f"official training semantics; {noise}"
        return f"variants: {', '.join(variants)}; {noise}"

    def claims(self) -> list[Claim]:
        me, sparse = self.stage, f"{self.name}_sparse"
        return [
            Claim(self.name, "budget", PAPER, "Sec. 3.3 (sparsity criterion)",
                  "The sparsity criterion makes the network execute the target fraction (budget) of its MACs.",
                  "executed fraction minus budget (test set)", "equivalence",
                  difference((me, "executed_fraction"), (me, "budget")), "budget"),
            Claim(self.name, "acc_vs_dense", PAPER, "abstract",
                  "Spatially sparse execution is faster without accuracy loss.",
                  "test accuracy, DynConv minus dense", "non_inferiority",
                  difference((me, "test_acc"), ("pretrain", "test_acc")), "dense", 100, " points"),
            Claim(self.name, "speedup", PAPER, "abstract (MPII pose: 60 % faster inference)",
                  "Sparse execution of the gated blocks makes inference faster than the dense network.",
                  "realized speed-up over the fastest dense runtime (PyTorch eager, ONNX Runtime, OpenVINO; "
                  "latency.runtimes), batch 1, CPU (latency stage)", "ratio_at_least",
                  value(("latency", f"{sparse}_speedup_b1")), "fastest dense runtime", 1, " x"),
            Claim(self.name, "acc_vs_random", PAPER, "Sec. 3 (trained masks)",
                  "Trained mask units choose where to compute better than chance.",
                  "test accuracy, DynConv minus random masks at its executed fraction", "superiority",
                  difference((me, "test_acc"), ("control@random_mask", "test_acc")), "random-mask control",
                  100, " points", control="random_mask"),
            Claim(self.name, "acc_vs_uniform", PAPER, "Sec. 3 (trained masks)",
                  "Trained mask units beat a fixed, evenly spread mask that executes as much.",
                  "test accuracy, DynConv minus a fixed uniform mask at its executed fraction", "superiority",
                  difference((me, "test_acc"), ("control@uniform_mask", "test_acc")), "uniform-mask control",
                  100, " points", control="uniform_mask"),
        ]

    def spatial_masks(self, model):
        return [(n, b.last_mask) for n, b in named_blocks(model)]


METHOD = DynConv()


class MaskControlParams(MethodParams):
    """The keys of ``convert.dynconv`` a mask control trains with."""

    mask_conv2_input: Bool


class MaskControl(Method):
    """Control of DynConv's learned gates: the same gated blocks with a mask that does not look at the input
    (:mod:`pipeline.ops.fixed_masks`), each block executing the fraction of its cost it executed in DynConv
    (``results/convert/dynconv/layers.json``), trained with DynConv's recipe (epochs, optimizer, distillation;
    no budget loss: the fraction is fixed)."""

    Params = MaskControlParams
    control_of = METHOD.name
    kind: str  # random | uniform
    columns = {"executed fraction": "executed_fraction"}

    def convert(self, model, p, seed):
        unit = {"random": RandomMask, "uniform": UniformMask}[self.kind]
        names = []
        for name, block in list(model.named_modules()):
            if type(block) is BasicBlock:
                gated = GatedBasicBlock.from_block(block)
            elif type(block) is InvertedResidual and block.use_res:
                gated = GatedInvertedResidual.from_block(block)
            else:
                continue
            gated.gate = unit(gated.gate.in_channels, gated.gate.stride)
            gated.mask_conv2_input = p.mask_conv2_input
            replace_module(model, name, gated)
            names.append(name)
        if not names:
            raise ConfigError(f"convert.{self.control_of}: the backbone has no residual block to gate")
        return names

    def warm_start(self, model, p, cfg, x):
        layers = get(self.control_of).layers_file
        if not layers.is_file():
            raise UserError(f"'{layers}' not found: the {self.label} control needs DynConv to run first")
        fractions = json.loads(layers.read_text())["executed_fraction"]
        was = model.training
        with torch.no_grad():
            model.eval()(x[:2])  # the blocks' map sizes
        model.train(was)
        for name, block in named_blocks(model):
            mask, dilated = block.last_mask, block.last_dilated
            on_input = dilated.shape[-2:] != mask.shape[-2:]  # the first conv on the input grid (a bottleneck)
            block.gate.density.fill_(density_for_fraction(
                self.kind, fractions[name], mask.shape[-2], mask.shape[-1], block.dilated_cost, block.masked_cost,
                block.gate.stride, tuple(dilated.shape[-2:]) if on_input else None))

    def hooks(self, model, p, *, teacher=None, val_x=None):
        return Hooks(extra_loss=lambda _m, inputs, logits, targets, progress: distill_term(p.distill, teacher, inputs,
                                                                                           logits),
                     epoch_metrics=lambda _m: {"executed_fraction": block_fractions(model, val_x)[1]})

    def measure(self, model, x, p):
        per_block, overall = block_fractions(model, x)
        names = [n for n, _ in named_blocks(model)]
        return {"executed_fraction": overall}, {"executed_fraction": dict(zip(names, per_block))}

    def latency_variants(self):
        return []
