"""DynConv spatial gating of torchvision's ResNet blocks (Verelst & Tuytelaars, "Dynamic Convolutions:
Exploiting Spatial Sparsity for Faster Inference", CVPR 2020; the official ImageNet code,
``classification/models/resnet_util.py`` and ``dynconv/maskunit.py``).

Every block is gated, the strided ones too, each by a mask unit at its output resolution (a 3x3 conv with
the block's stride plus a linear layer on the pooled input; ``MaskUnit``):

- ``GatedResNetBasicBlock`` (``torchvision.models.resnet.BasicBlock``): conv1 (3x3, the block's stride) runs
  at the 3x3 dilation of the mask, conv2 (3x3) at the mask;
  ``out = relu(identity + m * bn2(conv2(relu(bn1(conv1(x))))))``.
- ``GatedBottleneck`` (``torchvision.models.resnet.Bottleneck``): conv1 (1x1) runs at the input positions
  that conv2 reads for the mask's positions (the official ``ExpandMask``: the mask spread onto the input
  grid at the block's stride, then dilated 3x3), conv2 (3x3, the block's stride) and conv3 (1x1) at the
  mask; ``out = relu(identity + m * bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))``.

The shortcut (identity or the 1x1 projection ``downsample``) runs everywhere. Blocks run dense-masked, which
gives the numbers a sparse execution gives (``pipeline/ops/sparse_exec.py`` runs them sparsely at inference);
the MAC counter counts the executed positions (``GatedBlock.macs_per_image``). Submodule names match
torchvision's, so a dense block's state dict loads with only ``gate.*`` missing.
"""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.ops.spatial_gate import GatedBlock, MaskUnit, expand_mask


def _conv_cost(conv: nn.Conv2d) -> int:
    """MACs per output position."""
    return conv.in_channels * conv.out_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def _projection_cost(downsample: nn.Module | None) -> int:
    """MACs per output position of a shortcut projection (0 for the identity)."""
    if downsample is None:
        return 0
    return sum(_conv_cost(m) for m in downsample.modules() if isinstance(m, nn.Conv2d))


class _GatedTorchvisionBlock(GatedBlock):
    """What the two gated torchvision blocks share: the dense block's submodules under their own names, a
    mask unit with the block's stride, conv1's cost at the dilated mask, the shortcut projection's cost."""

    dense_name: str  # the torchvision block's class name in torchvision.models.resnet
    names: tuple[str, ...]

    def __init__(self, block: nn.Module):
        super().__init__()
        for name in self.names:
            setattr(self, name, getattr(block, name))
        self.stride = block.stride
        self.gate = MaskUnit(block.conv1.in_channels, self.stride)

    @classmethod
    def from_block(cls, block: nn.Module, open_bias: float = 3.0) -> _GatedTorchvisionBlock:
        """Gated copy of a dense block with the gate open (every position runs)."""
        if gated_type(block) is not cls:
            raise ValueError(f"from_block expects a torchvision {cls.dense_name}, got {type(block).__name__}")
        return cls(block)._adopt(block, cls.names, open_bias)

    @property
    def dilated_cost(self) -> int:
        return _conv_cost(self.conv1)

    @property
    def shortcut_cost(self) -> int:
        return _projection_cost(self.downsample)

    def _identity(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class GatedResNetBasicBlock(_GatedTorchvisionBlock):
    """torchvision's ResNet basic block with DynConv spatial gating (see the module docstring)."""

    dense_name = "BasicBlock"
    names = ("conv1", "bn1", "relu", "conv2", "bn2", "downsample")

    @property
    def masked_cost(self) -> int:
        return _conv_cost(self.conv2)

    def forward(self, x: Tensor) -> Tensor:
        mask, dilated = self._masks(x)
        h = self.relu(self.bn1(self.conv1(x)))
        if self.mask_conv2_input:
            h = h * dilated
        return self.relu(self._identity(x) + self.bn2(self.conv2(h)) * mask)


class GatedBottleneck(_GatedTorchvisionBlock):
    """torchvision's ResNet bottleneck with DynConv spatial gating (see the module docstring); conv1 runs at
    the input's resolution (its cost is per input position)."""

    dense_name = "Bottleneck"
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample")

    def dilate_mask(self, mask: Tensor, in_size: tuple[int, int]) -> Tensor:
        return expand_mask(mask, self.stride, in_size)

    @property
    def masked_cost(self) -> int:
        return _conv_cost(self.conv2) + _conv_cost(self.conv3)

    def forward(self, x: Tensor) -> Tensor:
        mask, dilated = self._masks(x)
        h = self.relu(self.bn1(self.conv1(x)))
        if self.mask_conv2_input:
            h = h * dilated
        h = self.relu(self.bn2(self.conv2(h)))
        if self.mask_conv2_input:
            h = h * mask
        return self.relu(self._identity(x) + self.bn3(self.conv3(h)) * mask)


def gated_type(block: nn.Module) -> type[_GatedTorchvisionBlock] | None:
    """The gated class of a torchvision ResNet block (``BasicBlock`` or ``Bottleneck`` exactly), None for any
    other module. torchvision is imported only for a module of its own, which means it is loaded already: a
    process that never builds a torchvision network does not pay its import (over a second, most of it
    ``torch._dynamo``, which ``torchvision.ops`` pulls in)."""
    if not type(block).__module__.startswith("torchvision."):
        return None
    from torchvision.models import resnet

    gated = {getattr(resnet, cls.dense_name): cls for cls in (GatedResNetBasicBlock, GatedBottleneck)}
    return gated.get(type(block))
