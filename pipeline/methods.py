"""What each method adds to the one training engine: schedules, losses, metrics.

- DyNet / SD-Conv: softmax temperature annealed linearly (DY-Conv: 30 -> 1 over
  the first epochs); distillation from the dense model when a teacher is given
  (``weight * T^2 * KL(softmax(t/T) || softmax(s/T))``, Hinton et al. 2015).
- SD-Conv: threshold regulariser ``reg_weight * sum exp(-t)`` (Dynamic Sparse
  Training, Liu et al. 2020); thresholds of a collapsed layer (keep ratio below
  ``min_keep``) reset to 0 at the start of each epoch.
- DynConv: the budget loss (network term + annealed per-block bounds), Gumbel
  noise switched off for the last ``noise_off_fraction`` of the epochs, and the
  same distillation from the dense model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DynConvCfg, DynamicCfg, SDConvCfg
from pipeline.train import Hooks


def dynamic_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from pipeline.ops.dynamic_conv import DynamicConv2d

    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicConv2d)]


def temperature_at(cfg: DynamicCfg, epoch: int) -> float:
    t = cfg.temperature
    if t.epochs == 0 or epoch >= t.epochs:
        return t.end
    return t.start + (t.end - t.start) * epoch / t.epochs


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
        log_target=True, reduction="batchmean",
    ) * temperature**2


def dynamic_hooks(model: nn.Module, cfg: DynamicCfg, teacher: nn.Module | None) -> Hooks:
    is_sd = isinstance(cfg, SDConvCfg)
    layers = [m for _, m in dynamic_layers(model)]

    def epoch_start(epoch: int) -> None:
        for m in layers:
            m.set_temperature(temperature_at(cfg, epoch))
            if is_sd:
                m.reset_collapsed(cfg.min_keep)

    def extra_loss(model, inputs, logits, targets, progress):
        out = {}
        if teacher is not None and cfg.distill.weight > 0:
            with torch.no_grad():
                t_logits = teacher(inputs)
            out["distill"] = cfg.distill.weight * distill_loss(logits, t_logits, cfg.distill.temperature)
        if is_sd and cfg.reg_weight > 0:
            out["threshold_reg"] = cfg.reg_weight * sum(m.regularization() for m in layers)
        return out

    def epoch_metrics(model):
        return {"kernel_sparsity": kernel_sparsity(layers)} if is_sd else {}

    return Hooks(epoch_start, extra_loss, epoch_metrics)


def kernel_sparsity(layers: list[nn.Module]) -> float:
    """Fraction of SD-Conv kernel weights pruned, over all layers."""
    kept = sum(m.keep_ratio() * m.weight.numel() for m in layers)
    return 1.0 - kept / sum(m.weight.numel() for m in layers)


def dynconv_hooks(model: nn.Module, cfg: DynConvCfg, epochs: int, val_inputs: torch.Tensor,
                  teacher: nn.Module | None, block_budgets: list[float] | None = None) -> Hooks:
    from pipeline.ops.spatial_gate import BudgetLoss, gated_blocks, set_gumbel

    criterion = BudgetLoss(cfg.budget, cfg.budget_weight, cfg.anneal_fraction, block_budgets)
    blocks = gated_blocks(model)
    noisy_epochs = epochs - int(round(cfg.noise_off_fraction * epochs))

    def epoch_start(epoch: int) -> None:
        set_gumbel(model, temperature=cfg.gumbel_temperature, noise=epoch < noisy_epochs)

    def extra_loss(model, inputs, logits, targets, progress):
        out = criterion(blocks, progress)
        if teacher is not None and cfg.distill.weight > 0:
            with torch.no_grad():
                t_logits = teacher(inputs)
            out["distill"] = cfg.distill.weight * distill_loss(logits, t_logits, cfg.distill.temperature)
        return out

    def epoch_metrics(model):
        return {"executed_fraction": block_fractions(model, val_inputs)[1]}

    return Hooks(epoch_start, extra_loss, epoch_metrics)


@torch.no_grad()
def block_fractions(model: nn.Module, inputs: torch.Tensor, batch_size: int = 500) -> tuple[list[float], float]:
    """Eval-mode executed fraction of every gated block and of the whole gated part (cost-weighted)."""
    from pipeline.ops.spatial_gate import gated_blocks

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

