"""torchvision's ImageNet networks in the compiled plan: ResNet (He et al., CVPR 2016: the 7x7 stride-2 stem,
3x3 stride-2 max pooling, basic blocks and bottlenecks with 1x1 projection shortcuts) and MobileNetV2 (Sandler
et al., CVPR 2018: inverted residuals with ReLU6), BatchNorm folded (``pipeline/fold.py``).

torchvision's modules cannot carry a ``plan_into``, so their planners are registered for their types
(:func:`pipeline.ops.plan.builder.planner`). The convs inside go through ``builder.conv``: a conv a method
swapped in (DyNet, SD-Conv, ODConv) joins through its own ``plan_into``, and a block a method replaced (DynConv's
sparse blocks) through the builder's ``block``.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import MobileNetV2, ResNet
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from pipeline.ops.plan.builder import ACT_NONE, ACT_RELU, ACT_RELU6, PlanBuilder, Unsupported, planner

_ACTS = {nn.ReLU: ACT_RELU, nn.ReLU6: ACT_RELU6}


def _act(name: str, module: nn.Module) -> int:
    act = _ACTS.get(type(module))
    if act is None:
        raise Unsupported(f"{name}: only ReLU and ReLU6 activations are compiled, not {type(module).__name__}")
    return act


def _shortcut(b: PlanBuilder, name: str, downsample: nn.Module | None, x: int) -> int:
    """The identity, or a folded 1x1 projection ``nn.Sequential(conv, Identity)``."""
    if downsample is None:
        return x
    if type(downsample) is not nn.Sequential or len(downsample) != 2:
        raise Unsupported(f"{name}.downsample: only a folded conv + BatchNorm projection is compiled")
    b.folded(f"{name}.downsample", downsample[1])
    return b.conv(f"{name}.downsample.0", downsample[0], x)


@planner(BasicBlock)
def basic_block(block: BasicBlock, b: PlanBuilder, name: str, x: int) -> int:
    """conv1 + ReLU, conv2 + shortcut + ReLU."""
    b.folded(name, block.bn1, block.bn2)
    act = _act(f"{name}.relu", block.relu)
    res = _shortcut(b, name, block.downsample, x)
    t = b.conv(f"{name}.conv1", block.conv1, x, act=act)
    return b.conv(f"{name}.conv2", block.conv2, t, res=res, act=act)


@planner(Bottleneck)
def bottleneck(block: Bottleneck, b: PlanBuilder, name: str, x: int) -> int:
    """conv1 (1x1) + ReLU, conv2 (3x3, the block's stride) + ReLU, conv3 (1x1) + shortcut + ReLU."""
    b.folded(name, block.bn1, block.bn2, block.bn3)
    act = _act(f"{name}.relu", block.relu)
    res = _shortcut(b, name, block.downsample, x)
    t = b.conv(f"{name}.conv1", block.conv1, x, act=act)
    t = b.conv(f"{name}.conv2", block.conv2, t, act=act)
    return b.conv(f"{name}.conv3", block.conv3, t, res=res, act=act)


@planner(ResNet)
def resnet(model: ResNet, b: PlanBuilder) -> None:
    """Stem conv + ReLU, max pooling, the four stages, pooling and the classifier."""
    b.folded("bn1", model.bn1)
    x = b.conv("conv1", model.conv1, 0, act=_act("relu", model.relu))
    x = b.max_pool("maxpool", model.maxpool, x)
    for s in (1, 2, 3, 4):
        x = b.sequence(f"layer{s}", getattr(model, f"layer{s}").named_children(), x)
    b.head("avgpool/fc", x, model.avgpool, model.fc)


def _conv_act(b: PlanBuilder, name: str, layer: nn.Module, x: int, res: int = -1) -> int:
    """A folded ``Conv2dNormActivation`` (conv, Identity, activation)."""
    if type(layer) is not Conv2dNormActivation or len(layer) != 3:
        raise Unsupported(f"{name}: expected a conv + BatchNorm + activation, got {type(layer).__name__}")
    b.folded(name, layer[1])
    return b.conv(f"{name}.0", layer[0], x, res=res, act=_act(f"{name}.2", layer[2]))


@planner(InvertedResidual)
def inverted_residual(block: InvertedResidual, b: PlanBuilder, name: str, x: int) -> int:
    """[1x1 expansion + ReLU6,] depthwise 3x3 + ReLU6, 1x1 projection [+ the input]."""
    layers = list(block.conv)
    if len(layers) not in (3, 4) or type(layers[-2]) is not nn.Conv2d and not hasattr(layers[-2], "plan_into"):
        raise Unsupported(f"{name}.conv: expected [expand,] depthwise, projection conv, BatchNorm")
    b.folded(f"{name}.conv", layers[-1])
    t = x
    for i, layer in enumerate(layers[:-2]):
        t = _conv_act(b, f"{name}.conv.{i}", layer, t)
    return b.conv(f"{name}.conv.{len(layers) - 2}", layers[-2], t, res=x if block.use_res_connect else -1,
                  act=ACT_NONE)


@planner(MobileNetV2)
def mobilenet_v2(model: MobileNetV2, b: PlanBuilder) -> None:
    """Stem, the inverted residuals, the 1x1 head conv, pooling and the classifier (dropout is the identity at
    inference)."""
    features = list(model.features.named_children())
    x = _conv_act(b, f"features.{features[0][0]}", features[0][1], 0)
    x = b.sequence("features", features[1:-1], x)
    x = _conv_act(b, f"features.{features[-1][0]}", features[-1][1], x)
    dropout, fc = model.classifier
    if type(dropout) is not nn.Dropout:
        raise Unsupported(f"classifier.0: expected dropout, got {type(dropout).__name__}")
    b.head("pool/classifier", x, nn.AdaptiveAvgPool2d(1), fc)
