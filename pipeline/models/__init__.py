"""Model registry: ``model.arch`` in params.yaml -> an ``nn.Module``.

CIFAR nets (``cifar_resnet``, ``cifar_mobilenetv2``) suit small images such as
the embedded digits and CIFAR; torchvision's ``resnet18``, ``resnet50``,
``resnet101``, ``mobilenet_v2`` and ``shufflenet_v2`` (x1.0) suit
ImageNet-style ImageFolder data. torchvision nets
start from random init or from a local state-dict file (``model.weights``);
nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pydantic import TypeAdapter, ValidationError

from pipeline.checkpoint import load_checkpoint, save_atomic
from pipeline.config import ModelCfg
from pipeline.errors import CheckpointError
from pipeline.models.cifar_mobilenetv2 import CifarMobileNetV2
from pipeline.models.cifar_resnet import CifarResNet

CIFAR_ARCHS = ("cifar_resnet", "cifar_mobilenetv2")


RESNET_LAYERS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3)),
                 "resnet101": ("bottleneck", (3, 4, 23, 3))}


def narrow_resnet(arch: str, width: float, num_classes: int) -> nn.Module:
    """torchvision's ResNet ``arch`` with every stage's channels scaled by ``width`` (divisible by 8, as
    torchvision's MobileNetV2 rounds), random init as torchvision's (Kaiming fan-out convs)."""
    from torchvision.models._utils import _make_divisible
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    kind, layers = RESNET_LAYERS[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    model = ResNet(block, list(layers), num_classes=num_classes)
    if width == 1.0:
        return model
    w = [_make_divisible(c * width, 8) for c in (64, 128, 256, 512)]
    model.inplanes = w[0]
    model.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(w[0])
    model.layer1 = model._make_layer(block, w[0], layers[0])
    for s in (2, 3, 4):
        setattr(model, f"layer{s}", model._make_layer(block, w[s - 1], layers[s - 1], stride=2))
    model.fc = nn.Linear(w[3] * block.expansion, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _torchvision(arch: str, width: float, in_channels: int, num_classes: int, weights: str | None) -> nn.Module:
    import torchvision.models as tvm

    classes = 1000 if weights else num_classes
    if arch in RESNET_LAYERS:
        model = narrow_resnet(arch, width, classes)
    elif arch == "mobilenet_v2":
        model = tvm.mobilenet_v2(weights=None, num_classes=classes, width_mult=width)
    else:
        model = tvm.shufflenet_v2_x1_0(weights=None, num_classes=classes)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"model.weights: file '{path}' not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign file
            raise CheckpointError(f"model.weights: '{path}' cannot be loaded as a state dict ({err})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "num_batches_tracked" not in m]:
            raise CheckpointError(
                f"model.weights: '{path}' does not fit torchvision {arch} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        _replace_head(model, num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first conv for one taking ``in_channels`` (weights averaged over RGB)."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(dim=1, keepdim=True).expand_as(new.weight))
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)


def model_cfg(raw: dict) -> ModelCfg:
    """The backbone params stored in a model file, validated."""
    return TypeAdapter(ModelCfg).validate_python(raw)


def build_model(cfg: ModelCfg, in_channels: int, num_classes: int) -> nn.Module:
    if cfg.arch == "cifar_resnet":
        return CifarResNet(cfg.depth, cfg.width, cfg.base_width, in_channels, num_classes)
    if cfg.arch == "cifar_mobilenetv2":
        return CifarMobileNetV2(cfg.width, in_channels, num_classes)
    return _torchvision(cfg.arch, cfg.width, in_channels, num_classes, cfg.weights)


def save_model(path: Path, model: nn.Module, cfg: ModelCfg, in_channels: int, num_classes: int, **meta) -> None:
    """Write a self-describing model file (atomic; loadable with ``weights_only=True``)."""
    save_atomic(
        {
            "model_cfg": cfg.model_dump(mode="json"),
            "in_channels": in_channels,
            "num_classes": num_classes,
            "state_dict": model.state_dict(),
            "meta": meta,
        },
        path,
    )


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a model written by :func:`save_model`; returns (model, the whole record)."""
    record = load_checkpoint(path)
    return model_from_record(record, path), record


def model_from_record(record: dict, path: Path) -> nn.Module:
    """The model a record written by :func:`save_model` describes (``path`` names it in errors)."""
    try:
        cfg = model_cfg(record["model_cfg"])
        model = build_model(cfg, int(record["in_channels"]), int(record["num_classes"]))
        model.load_state_dict(record["state_dict"])
    except (KeyError, RuntimeError, ValueError, ValidationError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not hold a model this code can rebuild ({err})") from None
    return model
