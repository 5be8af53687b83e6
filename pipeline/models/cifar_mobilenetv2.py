"""MobileNetV2 for small images (Sandler et al., "MobileNetV2: Inverted
Residuals and Linear Bottlenecks", CVPR 2018, Table 2), with the CIFAR
adaptation of stride 1 in the stem and the second stage so 32x32 inputs keep
enough resolution.

Inverted residual: 1x1 expand (``conv1``) - BN - ReLU6 - 3x3 depthwise
(``conv2``) - BN - ReLU6 - 1x1 project (``conv3``) - BN, with an identity
shortcut when stride is 1 and the widths match.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s)
CIFAR_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        self.stride = stride
        self.use_res = stride == 1 and in_ch == out_ch
        self.conv1 = nn.Conv2d(in_ch, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU6(inplace=True)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return x + out if self.use_res else out

    def plan_into(self, b, name: str, x: int) -> int:
        """The compiled plan (``pipeline/ops/plan``) of the BN-folded block: 1x1 expand + ReLU6, depthwise 3x3
        + ReLU6, 1x1 project [+ the input]."""
        b.folded(name, self.bn1, self.bn2, self.bn3)
        if type(self.act) is not nn.ReLU6:
            raise b.Unsupported(f"{name}.act: only ReLU6 is compiled")
        t = b.conv(f"{name}.conv1", self.conv1, x, act=b.ACT_RELU6)
        t = b.conv(f"{name}.conv2", self.conv2, t, act=b.ACT_RELU6)
        return b.conv(f"{name}.conv3", self.conv3, t, res=x if self.use_res else -1)


class CifarMobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, in_channels: int = 3, num_classes: int = 10, last_channels: int = 1280):
        super().__init__()
        in_ch = make_divisible(32 * width)
        self.stem = nn.Conv2d(in_channels, in_ch, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(in_ch)
        self.act = nn.ReLU6(inplace=True)
        blocks = []
        for t, c, n, s in CIFAR_SETTINGS:
            out_ch = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        last = make_divisible(last_channels * max(1.0, width))
        self.head = nn.Conv2d(in_ch, last, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(last)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = self.blocks(x)
        x = self.act(self.head_bn(self.head(x)))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def plan_into(self, b) -> None:
        """The compiled plan (``pipeline/ops/plan``) of the BN-folded network: stem + ReLU6, the blocks, the
        1x1 head conv + ReLU6, pooling and the classifier."""
        b.folded("bn", self.bn)
        b.folded("head_bn", self.head_bn)
        if type(self.act) is not nn.ReLU6:
            raise b.Unsupported("act: only ReLU6 is compiled")
        x = b.conv("stem", self.stem, 0, act=b.ACT_RELU6)
        x = b.sequence("blocks", self.blocks.named_children(), x)
        x = b.conv("head", self.head, x, act=b.ACT_RELU6)
        b.head("pool/fc", x, self.pool, self.fc)
