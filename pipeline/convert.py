"""Dense model -> method model, weights carried over.

- DyNet / SD-Conv: the selected convs become ``DynamicConv2d`` / ``SDConv2d``
  whose K kernels start from the dense kernel (plus small noise) and whose
  coefficient branch starts so that the converted model computes the dense
  function. With ``width < 1`` (DyNet's FLOPs-cut recipe: a narrower dynamic
  network) the narrower backbone is initialised with the first channels of
  every dense layer (the same indices everywhere, so residual streams stay
  aligned) and fine-tuned with the dense model as teacher.
- DynConv: every residual block becomes a gated block whose mask unit starts
  open (almost every position executes), so the start is the dense model.

A converted model is rebuilt from (model params, method params) by running the
same conversion on a fresh backbone, then loading the saved state dict.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from pipeline.config import DynConvCfg, DynamicCfg, ModelCfg, SDConvCfg
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.models.cifar_mobilenetv2 import InvertedResidual
from pipeline.models.cifar_resnet import BasicBlock

METHODS = ("dynet", "sdconv", "dynconv")


def conv_names(model: nn.Module, layers: str | list[str]) -> list[str]:
    """Names of the convs to convert: "auto" = every 3x3 conv but the first (the stem)."""
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    if layers == "auto":
        return [n for i, (n, m) in enumerate(convs) if i > 0 and m.kernel_size == (3, 3)]
    names = [n for n, _ in convs if any(fnmatch.fnmatchcase(n, p) for p in layers)]
    if not names:
        raise ConfigError(f"layers: no conv matches {layers}; conv names are e.g. {[n for n, _ in convs[:4]]}")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def narrow_copy(dense: nn.Module, narrow: nn.Module) -> nn.Module:
    """Initialise ``narrow`` (same arch, fewer channels) with the leading slice of every dense tensor."""
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


def to_dynamic(model: nn.Module, cfg: DynamicCfg, seed: int) -> list[str]:
    """Swap the selected convs for DynamicConv2d or SDConv2d in place; returns their names."""
    from pipeline.ops.dynamic_conv import DynamicConv2d
    from pipeline.ops.sd_conv import SDConv2d

    gen = torch.Generator().manual_seed(seed)
    names = conv_names(model, cfg.layers)
    common = dict(num_kernels=cfg.num_kernels, activation=cfg.activation, temperature=cfg.temperature.start,
                  reduction=cfg.reduction, noise_std=cfg.noise_std, generator=gen)
    for name in names:
        conv = model.get_submodule(name)
        if isinstance(cfg, SDConvCfg):
            new = SDConv2d.from_conv(conv, granularity=cfg.granularity, threshold_init=cfg.threshold_init,
                                     estimator=cfg.estimator, **common)
            if cfg.init_sparsity:
                init_thresholds(new, cfg.init_sparsity)
        else:
            new = DynamicConv2d.from_conv(conv, **common)
        _replace(model, name, new)
    return names


@torch.no_grad()
def init_thresholds(layer: nn.Module, sparsity: float) -> None:
    """Set an SD-Conv layer's thresholds to the ``sparsity`` quantile of |W| within each threshold group."""
    w = layer.weight.abs()
    t = layer.threshold
    # Every threshold covers the weight entries that broadcast onto it: reduce over the size-1 axes of t.
    dims = [d for d in range(w.dim()) if t.shape[d] == 1]
    moved = w.permute(*[d for d in range(w.dim()) if d not in dims], *dims)
    flat = moved.reshape(*[w.shape[d] for d in range(w.dim()) if d not in dims], -1)
    q = torch.quantile(flat, sparsity, dim=-1, keepdim=True)
    t.copy_(q.reshape(t.shape))


def to_gated(model: nn.Module, cfg: DynConvCfg) -> list[str]:
    """Swap residual blocks for gated ones (ResNet basic blocks; MobileNetV2 blocks with identity shortcut)."""
    from pipeline.ops.spatial_gate import GatedBasicBlock, GatedInvertedResidual, set_gumbel

    names = []
    for name, block in list(model.named_modules()):
        if type(block) is BasicBlock:
            _replace(model, name, GatedBasicBlock.from_block(block, open_bias=cfg.open_bias))
            names.append(name)
        elif type(block) is InvertedResidual and block.use_res:
            _replace(model, name, GatedInvertedResidual.from_block(block, open_bias=cfg.open_bias))
            names.append(name)
    if not names:
        raise ConfigError("convert.dynconv: the backbone has no residual block to gate (use cifar_resnet or cifar_mobilenetv2)")
    set_gumbel(model, temperature=cfg.gumbel_temperature, noise=True)
    return names


def backbone_cfg(model_cfg: ModelCfg, method: str, mcfg) -> ModelCfg:
    """The backbone a method builds on: the dense one, narrowed by ``width`` for DyNet/SD-Conv."""
    width = getattr(mcfg, "width", 1.0)
    if width == 1.0:
        return model_cfg
    if model_cfg.arch not in ("cifar_resnet", "cifar_mobilenetv2"):
        raise ConfigError(f"convert.{method}.width: narrowing is implemented for the CIFAR backbones, not {model_cfg.arch}")
    return model_cfg.model_copy(update={"width": model_cfg.width * width})


def build_method_model(method: str, model_cfg: ModelCfg, mcfg, in_channels: int, num_classes: int,
                       seed: int, dense: nn.Module | None = None) -> tuple[nn.Module, list[str]]:
    """The method's model; with ``dense`` given, its weights are carried over first."""
    bcfg = backbone_cfg(model_cfg, method, mcfg)
    model = build_model(bcfg, in_channels, num_classes)
    if dense is not None:
        if bcfg is model_cfg:
            model.load_state_dict(dense.state_dict())
        else:
            narrow_copy(dense, model)
    if method == "dynconv":
        names = to_gated(model, mcfg)
    else:
        names = to_dynamic(model, mcfg, seed)
    return model, names
