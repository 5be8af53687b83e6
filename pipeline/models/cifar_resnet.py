"""CIFAR ResNet (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, Sec. 4.2): depth 6n+2, three stages of n basic blocks at widths
w, 2w, 4w, a 3x3 stem, global average pooling and one linear layer.

Every conv is a named ``nn.Conv2d`` (``stem``, ``layerS.B.conv1``,
``layerS.B.conv2``, ``layerS.B.shortcut.0``) so a conversion can swap it by
module name; blocks are ``BasicBlock`` modules so a gated version can replace
them whole.
"""

from __future__ import annotations

import torch
from torch import nn


def scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Identity()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.shortcut(x) + self.residual(x))

    def plan_into(self, b, name: str, x: int) -> int:
        """The compiled plan (``pipeline/ops/plan``) of the BN-folded block: shortcut, conv1 + ReLU, conv2 +
        shortcut + ReLU."""
        b.folded(name, self.bn1, self.bn2)
        if type(self.shortcut) is nn.Identity:
            res = x
        elif type(self.shortcut) is nn.Sequential and len(self.shortcut) == 2:
            b.folded(f"{name}.shortcut", self.shortcut[1])
            res = b.conv(f"{name}.shortcut.0", self.shortcut[0], x)
        else:
            raise b.Unsupported(f"{name}.shortcut: only identity or a folded 1x1 conv is compiled")
        t = b.conv(f"{name}.conv1", self.conv1, x, act=b.ACT_RELU)
        return b.conv(f"{name}.conv2", self.conv2, t, res=res, act=b.ACT_RELU)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, width: float = 1.0, base_width: int = 16, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [scaled(base_width * m, width) for m in (1, 2, 4)]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_ch = widths[0]
        for s, out_ch in enumerate(widths, start=1):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_ch, out_ch, stride=2 if (s > 1 and b == 0) else 1))
                in_ch = out_ch
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def plan_into(self, b) -> None:
        """The compiled plan (``pipeline/ops/plan``) of the BN-folded network: stem + ReLU, the blocks, pooling
        and the classifier."""
        b.folded("bn", self.bn)
        first = self.layer1[0] if len(self.layer1) else None
        if getattr(first, "plan_reads_rows", False):
            x = b.conv_on_rows("stem", self.stem, 0, act=b.ACT_RELU)
        else:
            x = b.conv("stem", self.stem, 0, act=b.ACT_RELU)
        for s in (1, 2, 3):
            x = b.sequence(f"layer{s}", getattr(self, f"layer{s}").named_children(), x)
        b.head("pool/fc", x, self.pool, self.fc)
