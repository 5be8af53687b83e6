"""What one search trial does, for any method with a search space (``Method.search``).

A trial starts from the converted checkpoint (``models/<method>.pt``), applies
the sampled configuration (:meth:`SearchSpace.apply`), fine-tunes for
``steps`` optimizer steps per epoch (``search.<method>.train``, distillation
as in the conversion) on a fixed, seeded subset of the training split, and is
scored on the VALIDATION split only: accuracy (maximised) and the space's
costs (minimised), e.g. measured MACs per image from the masks that fire on
the validation images, or nonzero parameters.

Sampled values are per *stage*: the searched modules that share an output
resolution, found by one forward pass (:func:`stage_of`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, fingerprint, to_dict
from pipeline.data import TensorTask, load_task, sha256_file
from pipeline.methods.base import Method
from pipeline.methods.files import load_any_model
from pipeline.paths import CHECKPOINTS, MODELS, PREPARED
from pipeline.train import FitResult, fit, normalized


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
    method: Method
    p: Any  # convert.<method>
    sp: Any  # search.<method>
    data: TensorTask
    teacher: nn.Module | None
    val_x: torch.Tensor
    stages: list[int]
    study_key: str

    @property
    def n_stages(self) -> int:
        return max(self.stages) + 1

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.method.search.objectives


def load_context(cfg: Config, method: Method) -> SearchContext:
    p, sp = method.params(cfg), method.search_params(cfg)
    data = load_task("upstream")
    teacher = None
    if p.distill.weight > 0:
        teacher, _, _ = load_any_model(MODELS / "dense.pt")
        teacher.eval()
    model, _, _ = load_any_model(method.model_file)
    val_x = normalized(data, "val")
    stages = stage_of(model, method.search.modules(model), val_x[:2])
    # Everything a trial's result depends on; n_trials, timeout and the
    # selection knobs are left out so that raising n_trials continues the study.
    key = fingerprint({
        "method": method.name, "seed": cfg.train_seed, "model": to_dict(cfg.model), "convert": to_dict(p),
        "search": {k: v for k, v in to_dict(sp).items() if k not in ("n_trials", "timeout", "final_steps", "select_within")},
        "converted": sha256_file(method.model_file), "data": sha256_file(PREPARED / "card.json"),
    })  # fmt: skip
    return SearchContext(cfg, method, p, sp, data, teacher, val_x, stages, key)


def finetune(ctx: SearchContext, sample: dict[str, float], seed: int, steps: int, desc: str,
             test: bool = False) -> tuple[nn.Module, FitResult]:
    """Load the converted model, apply ``sample`` and fine-tune ``steps`` steps per epoch."""
    model, _, _ = load_any_model(ctx.method.model_file)
    hooks = ctx.method.search.apply(model, sample, ctx.stages, ctx.p, ctx.sp, teacher=ctx.teacher, val_x=ctx.val_x)
    task = train_subset(ctx.data, steps * ctx.sp.train.batch_size, trial_seed(ctx.cfg.train_seed, -1))
    resume_key = fingerprint({"study": ctx.study_key, "params": sample, "seed": seed, "steps": steps})
    ckpt = CHECKPOINTS / f"search_{ctx.method.name}_{resume_key[:12]}.pt"
    result = fit(model, task, ctx.sp.train, seed, ckpt, resume_key, hooks=hooks, desc=desc, test=test)
    return model, result


def measure_val(ctx: SearchContext, model: nn.Module, val_acc: float) -> dict[str, float]:
    """The objectives, by name, measured on the validation images."""
    values = {"val_acc": float(val_acc), "macs_per_image": count_macs(model, ctx.val_x),
              "nonzero_params": float(count_params(model)["nonzero_params"])}
    return {k: values[k] for k in ctx.objectives}


def objective(ctx: SearchContext):
    """The Optuna objective: a list of values in ``ctx.objectives`` order."""

    def run(trial) -> list[float]:
        sample = ctx.method.search.suggest(trial, ctx.n_stages, ctx.sp.space)
        model, result = finetune(ctx, sample, trial_seed(ctx.cfg.train_seed, trial.number), ctx.sp.steps,
                                 desc=f"{ctx.method.name} trial {trial.number}")
        values = measure_val(ctx, model, result.final["val_acc"])
        trial.set_user_attr("train_seconds", result.timing["train_seconds"])
        return [values[k] for k in ctx.objectives]

    return run
