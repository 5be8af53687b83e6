"""Whole-model compiled inference: one call per batch, no Python between layers.

At batch 1 a CIFAR ResNet at DyNet's width runs about 7 M MACs; PyTorch's
per-operator dispatch then costs more than the arithmetic, and a runtime that
fuses the dense model (ONNX Runtime, OpenVINO) wins even with 4 x the MACs.
:func:`compile_model` asks an eval-mode, BN-folded model to describe itself
to a :class:`~pipeline.ops.plan.builder.PlanBuilder` (``model.plan_into``);
:class:`PlannedModel` runs the plan. The model's own forward stays the
reference: tests compare the two on random inputs, and the plan is rebuilt
when a parameter it was built from changes.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.ops import native
from pipeline.ops.plan.builder import PlanBuilder, Unsupported, plan_hook


def compile_model(model: nn.Module, shape: tuple[int, int, int]) -> tuple[object, list[torch.Tensor]]:
    """The compiled plan of an eval-mode, BN-folded model for inputs [B, *shape], and the tensors it was built
    from. Raises :class:`Unsupported` naming the first part it cannot run."""
    hook = plan_hook(model)
    if hook is None:
        raise Unsupported(f"{type(model).__name__}: the model has no compiled plan")
    if model.training:
        raise Unsupported("the model is in training mode")
    b = PlanBuilder(shape)
    with torch.no_grad():
        hook(b)
    return b.plan, b.sources


class PlannedModel(nn.Module):
    """``model`` (eval mode, BatchNorm folded) whose no-grad float32 CPU forward runs the compiled plan.

    Same function as ``model``; gradients, other devices and dtypes go through ``model`` itself. The plan
    is built on the first call per input size and rebuilt when a parameter it was built from changed in
    place; a parameter replaced by another tensor object is not seen (wrap the model anew).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._plans: dict[tuple[int, ...], object] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_plans": {}}

    def plan_for(self, shape: tuple[int, ...]):
        """The compiled plan for inputs [B, *shape], built or rebuilt as needed; raises :class:`Unsupported`."""
        plan = self._plans.get(shape)
        if plan is not None and plan.current():
            return plan
        plan, sources = compile_model(self.model, shape)
        if plan.watch(sources):  # inference tensors (no version counter) cannot be watched: not cached
            self._plans[shape] = plan
        return plan

    def threads_per_image(self, shape: tuple[int, ...], threads: int, batch: int) -> int | None:
        """Threads that ran each image of a [batch, *shape] call on ``threads`` threads: 1 where each thread
        runs whole images (batch >= threads); below, what the plan chose on its first such call (the threads
        sharing every layer, or one thread alone: whichever it timed faster); None before that call."""
        if threads <= 1 or batch >= threads:
            return 1
        plan = self._plans.get(tuple(shape))
        return (plan.team(threads, batch) or None) if plan is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.model.training or not native.usable(x):
            return self.model(x)
        return self.plan_for(tuple(x.shape[1:])).forward(x)


def probe_shape(model: nn.Module) -> tuple[int, int, int]:
    """A small input shape with the model's input channels (its first conv's), to check that the plan compiles
    (plans for the real input size are built on the first call)."""
    first = next((m for m in model.modules() if isinstance(getattr(m, "in_channels", None), int)), None)
    return getattr(first, "in_channels", 1), 8, 8


def plan_or_reason(model: nn.Module) -> tuple[nn.Module, str | None]:
    """``(PlannedModel(model), None)`` if the plan compiles for the model, else ``(model, why not)``: the
    layer that stopped it and what it lacks."""
    wrapped = PlannedModel(model)
    try:
        wrapped.plan_for(probe_shape(model))
    except Unsupported as err:
        return model, str(err)
    return wrapped, None


def planned(model: nn.Module) -> nn.Module:
    """``PlannedModel(model)`` if the plan compiles for the model, else ``model`` unchanged."""
    return plan_or_reason(model)[0]
