"""Model surgery shared by the methods: which convs to convert, swapping a module by name,
a narrower copy of a backbone, and a new classifier head."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from pipeline.config import NARROWABLE
from pipeline.errors import ConfigError


def conv_names(model: nn.Module, layers: str | list[str], key: str = "layers") -> list[str]:
    """Names of the convs to convert: "auto" = every 3x3 conv but the first (the stem), or fnmatch patterns.

    ``key`` names the param in the error raised when no conv matches.
    """
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    if layers == "auto":
        return [n for i, (n, m) in enumerate(convs) if i > 0 and m.kernel_size == (3, 3)]
    names = [n for n, _ in convs if any(fnmatch.fnmatchcase(n, p) for p in layers)]
    if not names:
        raise ConfigError(f"{key}: no conv matches {layers}; conv names are e.g. {[n for n, _ in convs[:4]]}")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is (``name`` as in ``named_modules``)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def narrowed(model_cfg, width: float, key: str):
    """The backbone params with the channel multiplier scaled by ``width`` (DyNet's FLOPs-cut recipe).

    ``key`` names the param in the error raised for a backbone without a channel multiplier.
    """
    if width == 1.0:
        return model_cfg
    if not isinstance(model_cfg, NARROWABLE) or model_cfg.arch == "shufflenet_v2":
        raise ConfigError(f"{key}: narrowing is implemented for the CIFAR backbones, the torchvision ResNets and "
                          f"MobileNetV2, not {model_cfg.arch}")
    if getattr(model_cfg, "weights", None):
        raise ConfigError(f"{key}: a narrowed net cannot start from model.weights (the width-1 net's); set "
                          f"{key}: 1.0 or model.weights: null")
    return model_cfg.model_copy(update={"width": model_cfg.width * width})


def narrow_copy(dense: nn.Module, narrow: nn.Module) -> nn.Module:
    """Initialise ``narrow`` (same arch, fewer channels) with the leading slice of every dense tensor.

    The same indices everywhere, so residual streams stay aligned.
    """
    source = dense.state_dict()
    state = {}
    for key, target in narrow.state_dict().items():
        src = source[key]
        if src.dim() == 0:
            state[key] = src.clone()
            continue
        index = tuple(slice(0, n) for n in target.shape)
        state[key] = src[index].clone()
    narrow.load_state_dict(state)
    return narrow


def classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer (replaced for transfer, kept trainable for linear probes)."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model.fc
    return model.classifier[-1]


def new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Linear:
    """Replace the classifier with a fresh ``nn.Linear`` (seeded) for ``num_classes``."""
    old = classifier(model)
    torch.manual_seed(seed)
    head = nn.Linear(old.in_features, num_classes)
    if getattr(model, "fc", None) is old:
        model.fc = head
    else:
        model.classifier[-1] = head
    return head
