"""Fold inference-mode BatchNorm into the convolution before it.

For an eval-mode BN after a conv, ``bn(conv(x)) = conv'(x)`` with
``W' = W * s`` (per output channel) and ``b' = (b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)``. Every model the latency stage times gets the
same treatment, so no model pays for BN the others skip.

Pairs are found by the naming conventions of the project's models:
``convN``/``bnN`` siblings, ``stem``/``bn``, ``head``/``head_bn`` and
``nn.Sequential(conv, bn)`` shortcuts. Other operators fold themselves: a
module with ``fold_batchnorm(scale, shift)`` folds the BN into its own
parameters where that is exact and says whether it did (DyNet / SD-Conv with
softmax coefficients, ODConv); a BN it cannot take stays.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PAIRS = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("stem", "bn"), ("head", "head_bn")]


def _scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s, bn.bias - bn.running_mean * s


@torch.no_grad()
def _fold_conv(conv: nn.Module, bn: nn.BatchNorm2d) -> bool:
    s, shift = _scale_shift(bn)
    own = getattr(conv, "fold_batchnorm", None)
    if callable(own):
        return bool(own(s, shift))
    if type(conv) is not nn.Conv2d:
        return False
    conv.weight.mul_(s.view(-1, 1, 1, 1))
    old = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    conv.bias = nn.Parameter(old * s + shift)
    return True


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every foldable BN folded (replaced by ``nn.Identity``)."""
    model = copy.deepcopy(model).eval()
    folded = 0
    for module in list(model.modules()):
        children = dict(module.named_children())
        for conv_name, bn_name in PAIRS:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if isinstance(bn, nn.BatchNorm2d) and conv is not None and _fold_conv(conv, bn):
                setattr(module, bn_name, nn.Identity())
                folded += 1
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i + 1], nn.BatchNorm2d) and _fold_conv(module[i], module[i + 1]):
                    module[i + 1] = nn.Identity()
                    folded += 1
    return model, folded
