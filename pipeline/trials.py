"""What one search trial does, for SD-Conv and DynConv.

A trial starts from the converted checkpoint (``models/<method>.pt``), applies
the sampled configuration, fine-tunes for ``steps`` optimizer steps per epoch
(``search.<method>.train``, distillation as in the conversion) on a fixed,
seeded subset of the training split, and is scored on the VALIDATION split
only: accuracy (maximised) and measured MACs per image (minimised; for
DynConv from the masks that fire on the validation images), plus nonzero
parameters for SD-Conv (minimised).

Sampled configuration, one value per *stage* (the converted layers or gated
blocks that share an output resolution, found by one forward pass):
- SD-Conv (He et al., WACV 2023): ``sparsity_stage<i>``: the layer's
  thresholds are re-initialised at that quantile of |W| within each threshold
  group (the converted model is already pruned: pruned weights are 0 and stay
  0, so targets below its sparsity leave a layer as it is), then learned under
  the regulariser ``reg_weight * sum exp(-t)``.
- DynConv (Verelst & Tuytelaars, CVPR 2020): network ``budget``;
  ``offset_stage<i>`` moves stage i's budget away from it (clipped to
  [0.05, 1]); ``gumbel_temperature``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, TemperatureCfg, fingerprint, to_dict
from pipeline.convert import init_thresholds
from pipeline.data import TensorTask, load_task, sha256_file
from pipeline.finetune import load_method_model, normalized
from pipeline.methods import dynamic_hooks, dynamic_layers, dynconv_hooks
from pipeline.models import load_model
from pipeline.paths import CHECKPOINTS, MODELS, PREPARED
from pipeline.train import FitResult, fit

SEARCHABLE = ("sdconv", "dynconv")
# Objective names in study order; objective 0 is maximised, the rest minimised.
OBJECTIVES = {"sdconv": ("val_acc", "macs_per_image", "nonzero_params"), "dynconv": ("val_acc", "macs_per_image")}
# The cost that best.json minimises among near-best trials.
SELECT_COST = {"sdconv": "nonzero_params", "dynconv": "macs_per_image"}
MIN_STAGE_BUDGET = 0.05


def searched_modules(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    if method == "sdconv":
        return dynamic_layers(model)
    from pipeline.ops.spatial_gate import gated_blocks

    blocks = set(gated_blocks(model))
    return [(n, m) for n, m in model.named_modules() if m in blocks]


@torch.no_grad()
def stage_of(model: nn.Module, modules: list[tuple[str, nn.Module]], sample: torch.Tensor) -> list[int]:
    """Stage index of each module: modules with the same output resolution form a stage, largest first."""
    sizes: dict[str, int] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=n: sizes.__setitem__(name, out.shape[-2] * out.shape[-1]))
        for n, m in modules
    ]
    was = model.training
    model.eval()
    try:
        model(sample)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    order = sorted(set(sizes.values()), reverse=True)
    return [order.index(sizes[n]) for n, _ in modules]


def train_subset(data: TensorTask, images: int, seed: int) -> TensorTask:
    """A task whose train split is ``images`` images drawn (seeded, cycling if needed) from ``data``'s."""
    x, y = data.splits["train"]
    gen = torch.Generator().manual_seed(seed)
    reps = -(-images // len(y))
    idx = torch.cat([torch.randperm(len(y), generator=gen) for _ in range(reps)])[:images]
    return replace(data, splits={**data.splits, "train": (x[idx], y[idx])})


def trial_seed(seed: int, number: int) -> int:
    return int.from_bytes(hashlib.sha256(f"trial:{seed}:{number}".encode()).digest()[:4], "little")


@dataclass
class SearchContext:
    cfg: Config
    method: str
    data: TensorTask
    teacher: nn.Module | None
    val_x: torch.Tensor
    stages: list[int]
    study_key: str

    @property
    def scfg(self):
        return getattr(self.cfg.search, self.method)

    @property
    def mcfg(self):
        return getattr(self.cfg.convert, self.method)

    @property
    def n_stages(self) -> int:
        return max(self.stages) + 1

    @property
    def converted_path(self) -> Path:
        return MODELS / f"{self.method}.pt"


def load_context(cfg: Config, method: str) -> SearchContext:
    if method not in SEARCHABLE:
        raise ValueError(f"no search for method {method!r}; searchable: {SEARCHABLE}")
    mcfg = getattr(cfg.convert, method)
    data = load_task("upstream")
    teacher = None
    if mcfg.distill.weight > 0:
        teacher, _ = load_model(MODELS / "dense.pt")
        teacher.eval()
    model, _ = load_method_model(MODELS / f"{method}.pt")
    val_x = normalized(data, "val")
    stages = stage_of(model, searched_modules(model, method), val_x[:2])
    scfg = getattr(cfg.search, method)
    # Everything a trial's result depends on; n_trials, timeout and the
    # selection knobs are left out so that raising n_trials continues the study.
    key = fingerprint({
        "method": method, "seed": cfg.seed, "model": to_dict(cfg.model), "convert": to_dict(mcfg),
        "search": {k: v for k, v in to_dict(scfg).items() if k not in ("n_trials", "timeout", "final_steps", "select_within")},
        "converted": sha256_file(MODELS / f"{method}.pt"), "data": sha256_file(PREPARED / "card.json"),
    })  # fmt: skip
    return SearchContext(cfg, method, data, teacher, val_x, stages, key)


def suggest(trial: Any, ctx: SearchContext) -> dict[str, float]:
    """Sample one configuration (parameter names as stored in the study)."""

    def draw(name: str, r) -> float:
        return trial.suggest_float(name, r.low, r.high, log=r.log)

    space = ctx.scfg.space
    if ctx.method == "sdconv":
        params = {f"sparsity_stage{i}": draw(f"sparsity_stage{i}", space.stage_sparsity) for i in range(ctx.n_stages)}
        params["reg_weight"] = draw("reg_weight", space.reg_weight)
        return params
    params = {"budget": draw("budget", space.budget)}
    params.update({f"offset_stage{i}": draw(f"offset_stage{i}", space.stage_offset) for i in range(ctx.n_stages)})
    params["gumbel_temperature"] = draw("gumbel_temperature", space.gumbel_temperature)
    return params


def stage_budgets(params: dict[str, float], n_stages: int) -> list[float]:
    return [min(1.0, max(MIN_STAGE_BUDGET, params["budget"] + params[f"offset_stage{i}"])) for i in range(n_stages)]


def finetune(ctx: SearchContext, params: dict[str, float], seed: int, steps: int, desc: str,
             test: bool = False) -> tuple[nn.Module, FitResult]:
    """Load the converted model, apply ``params`` and fine-tune ``steps`` steps per epoch."""
    model, _ = load_method_model(ctx.converted_path)
    modules = [m for _, m in searched_modules(model, ctx.method)]
    scfg = ctx.scfg
    epochs = scfg.train.epochs
    if ctx.method == "sdconv":
        for m, stage in zip(modules, ctx.stages):
            init_thresholds(m, params[f"sparsity_stage{stage}"])
        end = ctx.mcfg.temperature.end  # the converted model was trained down to this temperature
        mcfg = ctx.mcfg.model_copy(update={"reg_weight": params["reg_weight"],
                                           "temperature": TemperatureCfg(start=end, end=end, epochs=0)})
        hooks = dynamic_hooks(model, mcfg, ctx.teacher)
    else:
        mcfg = ctx.mcfg.model_copy(update={"budget": params["budget"],
                                           "gumbel_temperature": params["gumbel_temperature"]})
        budgets = stage_budgets(params, ctx.n_stages)
        hooks = dynconv_hooks(model, mcfg, epochs, ctx.val_x, ctx.teacher, [budgets[s] for s in ctx.stages])
    task = train_subset(ctx.data, steps * scfg.train.batch_size, trial_seed(ctx.cfg.seed, -1))
    resume_key = fingerprint({"study": ctx.study_key, "params": params, "seed": seed, "steps": steps})
    ckpt = CHECKPOINTS / f"search_{ctx.method}_{resume_key[:12]}.pt"
    result = fit(model, task, scfg.train, seed, ckpt, resume_key, hooks=hooks, desc=desc, test=test)
    return model, result


def measure_val(ctx: SearchContext, model: nn.Module, val_acc: float) -> dict[str, float]:
    """The objectives, by name, measured on the validation images."""
    values = {"val_acc": float(val_acc), "macs_per_image": count_macs(model, ctx.val_x)}
    if ctx.method == "sdconv":
        values["nonzero_params"] = float(count_params(model)["nonzero_params"])
    return values


def objective(ctx: SearchContext):
    """The Optuna objective: a list of values in ``OBJECTIVES[method]`` order."""

    def run(trial) -> list[float]:
        params = suggest(trial, ctx)
        model, result = finetune(ctx, params, trial_seed(ctx.cfg.seed, trial.number), ctx.scfg.steps,
                                 desc=f"{ctx.method} trial {trial.number}")
        values = measure_val(ctx, model, result.final["val_acc"])
        trial.set_user_attr("train_seconds", result.timing["train_seconds"])
        return [values[k] for k in OBJECTIVES[ctx.method]]

    return run
