"""SD-Conv: dynamic convolution whose static kernels are sparsified by learnable thresholds."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.ops.dynamic_conv import DynamicConv2d

GRANULARITIES = ("layer", "kernel", "filter", "channel")
ESTIMATORS = ("ste", "long_tailed")
PRUNED_FORMAT = "sd_conv2d/pruned/1"


def long_tailed_grad(x: torch.Tensor) -> torch.Tensor:
    """Derivative estimate of step(x) from Dynamic Sparse Training (Liu et al., ICLR 2020, Eq. 5).

    g(x) = 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, and 0 beyond.
    """
    ax = x.abs()
    return torch.where(ax <= 0.4, 2 - 4 * ax, torch.where(ax <= 1, torch.full_like(ax, 0.4), torch.zeros_like(ax)))


class Step(torch.autograd.Function):
    """Unit step, 1 where x > 0 (strictly) and 0 elsewhere, with an estimated gradient.

    The strict inequality makes a weight of exactly 0 masked out under a
    threshold of 0, which ``SDConv2d.from_pruned`` relies on.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, estimator: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.estimator = estimator
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.estimator == "ste":
            return grad, None
        (x,) = ctx.saved_tensors
        return grad * long_tailed_grad(x), None


class SDConv2d(DynamicConv2d):
    """Dynamic convolution with K static kernels masked by learnable thresholds.

    Implements SD-Conv (He, Jiang, Dong, Ding, "SD-Conv: Towards the
    Parameter-Efficiency of Dynamic Convolution", arXiv 2204.02227, WACV
    2023): W(x) = sum_k a_k(x) (W_k ⊙ M_k), with masks in the form of Dynamic
    Sparse Training (Liu et al., "Dynamic Sparse Training: Find Efficient
    Sparse Network From Scratch With Trainable Masked Layers", ICLR 2020,
    Eq. 3-4): M_k = step(|W_k| - t), the step's gradient passed by a
    straight-through or long-tailed estimator, and the sparsity regulariser
    alpha * sum(exp(-t)) (Eq. 7) returned, unweighted, by ``regularization``.
    Thresholds are shared per layer, per static kernel, per output filter of
    each kernel, or per (kernel, filter, input channel) slice.
    """

    def __init__(self, *args: Any, granularity: str = "filter", threshold_init: float = 0.0,
                 estimator: str = "long_tailed", **kwargs: Any):
        """``DynamicConv2d``'s arguments, then the masks' threshold granularity, start and gradient estimator.
        ``from_conv`` (inherited) carries a dense conv over; with ``threshold_init`` 0 every nonzero weight is
        kept, so the module computes the dense conv's function when ``noise_std`` is 0."""
        super().__init__(*args, **kwargs)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        threshold_init = float(threshold_init)
        if not math.isfinite(threshold_init) or threshold_init < 0:
            raise ValueError(f"threshold_init must be a finite number >= 0, got {threshold_init!r}")
        self.granularity = granularity
        self.estimator = estimator
        self.threshold_init = threshold_init
        k, out, in_g = self.weight.shape[:3]
        shape = {"layer": (1, 1, 1), "kernel": (k, 1, 1), "filter": (k, out, 1), "channel": (k, out, in_g)}[granularity]
        self.threshold = nn.Parameter(torch.full((*shape, 1, 1), threshold_init))

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "granularity": self.granularity,
            "threshold_init": self.threshold_init,
            "estimator": self.estimator,
        }

    def mask(self) -> torch.Tensor:
        """Binary masks step(|W| - t), shape of ``weight``, differentiable through the estimator."""
        return Step.apply(self.weight.abs() - self.threshold, self.estimator)

    def _kept(self) -> torch.Tensor:
        """Boolean mask, without autograd."""
        with torch.no_grad():
            return self.weight.abs() - self.threshold > 0

    def kernels(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.weight * self.mask()
        # Inference: the masked kernels change only when the weights or thresholds do.
        w, t = self.weight, self.threshold
        return self._cached("kernels", (w, t), lambda: w * (w.abs() > t))

    def _native_sources(self) -> tuple[torch.Tensor | None, ...]:
        return (*super()._native_sources(), self._parameters["threshold"])

    def regularization(self) -> torch.Tensor:
        """sum(exp(-t)) over all thresholds; the caller multiplies by the regulariser weight."""
        return torch.exp(-self.threshold).sum()

    def keep_ratio(self) -> float:
        return self._kept().float().mean().item()

    def kernel_sparsity(self) -> float:
        return 1.0 - self.keep_ratio()

    def nonzero_params(self) -> int:
        """Kept kernel weights plus every bias, routing and threshold parameter."""
        others = sum(p.numel() for name, p in self.named_parameters() if name != "weight")
        return int(self._kept().sum().item()) + others

    def dense_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def reset_collapsed(self, min_keep: float = 0.01) -> bool:
        """Reset the thresholds to 0 when fewer than ``min_keep`` of the weights survive, as DST does."""
        if not 0 <= min_keep <= 1:
            raise ValueError(f"min_keep must be in [0, 1], got {min_keep!r}")
        if self.keep_ratio() >= min_keep:
            return False
        self.threshold.zero_()
        return True

    def macs(self, input_shape: tuple[int, int, int]) -> dict[str, int]:
        """Per-image MACs of a kernel-sparse execution.

        ``aggregation`` mixes only kept weights; ``conv`` counts, for each
        output filter, the kernel positions kept by at least one of the K
        masks (the mixed kernel is zero elsewhere); ``conv_dense`` is the
        dense conv for reference.
        """
        dense = super().macs(input_shape)
        kept = self._kept()
        h_out, w_out = self.output_hw(*input_shape[1:])
        conv = h_out * w_out * int(kept.any(dim=0).sum().item())
        aggregation = int(kept.sum().item())
        if self.bias is not None:
            aggregation += self.num_kernels * self.out_channels
        routing = dense["routing"]
        return {
            "conv": conv,
            "aggregation": aggregation,
            "routing": routing,
            "total": conv + aggregation + routing,
            "conv_dense": dense["conv"],
        }

    def pruned_params(self) -> int:
        """Parameters the masks remove, for the nonzero-parameter count (``pipeline/complexity.py``)."""
        return self.dense_params() - self.nonzero_params()

    def no_weight_decay(self) -> set[str]:
        """Weight decay would pull the thresholds to 0 and undo the sparsity (``pipeline/train.py``)."""
        return {"threshold"}

    @torch.no_grad()
    def fold_batchnorm(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        """Bake the masks into the weights first (thresholds 0, as in the pruned export), so scaling W
        cannot move them; then fold as the dynamic conv does."""
        if self.activation != "softmax":
            return False
        self.weight.mul_(self.weight.abs() > self.threshold)
        self.threshold.zero_()
        return super().fold_batchnorm(scale, shift)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}, estimator={self.estimator}"

    @torch.no_grad()
    def export_pruned(self) -> dict[str, Any]:
        """What the masks keep: masked kernels as a sparse COO tensor, bias, routing and config.

        Loadable with ``torch.load(..., weights_only=True)``; the thresholds
        are not stored (``from_pruned`` re-derives the masks from the zeros).
        """
        return {
            "format": PRUNED_FORMAT,
            "config": self.config(),
            "kernels": self.kernels().detach().to_sparse().coalesce(),
            "bias": None if self.bias is None else self.bias.detach().clone(),
            "routing": {name: t.detach().clone() for name, t in self.routing.state_dict().items()},
        }

    @classmethod
    def from_pruned(cls, record: dict[str, Any]) -> SDConv2d:
        """Rebuild a module computing the same function as the one ``export_pruned`` came from.

        Pruned weights are exactly 0 and the thresholds are 0, so the strict
        step reproduces the masks.
        """
        if not isinstance(record, dict) or record.get("format") != PRUNED_FORMAT:
            raise ValueError(f"record must be a dict from SDConv2d.export_pruned (format {PRUNED_FORMAT!r})")
        module = cls(**record["config"])
        kernels = record["kernels"].to_dense()
        if kernels.shape != module.weight.shape:
            raise ValueError(f"record kernels shape {list(kernels.shape)} does not match {list(module.weight.shape)}")
        with torch.no_grad():
            module.to(device=kernels.device, dtype=kernels.dtype)
            module.weight.copy_(kernels)
            module.threshold.zero_()
            if module.bias is not None:
                module.bias.copy_(record["bias"])
        module.routing.load_state_dict(record["routing"])
        return module
