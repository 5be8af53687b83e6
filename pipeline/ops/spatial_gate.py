"""DynConv spatial gating (Verelst & Tuytelaars, "Dynamic Convolutions:
Exploiting Spatial Sparsity for Faster Inference", CVPR 2020).

A small mask unit predicts, per output position of a residual block, whether
the residual branch runs there; skipped positions pass the shortcut only. The
masks are hard (binary) in the forward pass and trained with the Gumbel-Softmax
trick and a straight-through gradient, and a budget loss steers the executed
fraction of the block MACs towards a target.

Blocks run *dense-masked*: every conv runs over the whole map and the outputs
are multiplied by the masks, which gives exactly the numbers a sparse (gather /
scatter) execution would give. The MAC counters report what the sparse
execution would cost.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distributed import mean_across_ranks
from pipeline.models.cifar_mobilenetv2 import InvertedResidual
from pipeline.models.cifar_resnet import BasicBlock

# Tensors kept from the last forward for inspection and the budget loss; they
# carry autograd graphs, which cannot be deep-copied or pickled.
_TRANSIENT = ("last_logits", "last_mask", "last_dilated")


def _drop_transient(state: dict) -> dict:
    return {k: (None if k in _TRANSIENT else v) for k, v in state.items()}


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_temperature(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def _check_noise(value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"noise must be True or False, got {value!r}")
    return value


def _gumbel_difference_like(t: Tensor) -> Tensor:
    # g1 - g2 for independent Gumbel(0, 1) is Logistic(0, 1) = logit(U): one uniform draw
    # instead of two exponentials (RNG is a visible share of a training step on CPU).
    # Drawn from torch's global generator, so the caller's seeding controls it.
    u = torch.rand_like(t).clamp_(1e-6, 1.0 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


class MaskUnit(nn.Module):
    """Spatial mask unit of DynConv (Verelst & Tuytelaars, CVPR 2020, "trainable mask" and "binary Gumbel-Softmax").

    Logits per output position: a 3x3 conv (C -> 1, the block's stride) plus a
    linear layer on the globally pooled input, broadcast over positions.
    Training: binary Gumbel-Softmax with a straight-through gradient,
    ``hard = [sigmoid((logits + g1 - g2) / T) >= 0.5]``. Eval: ``hard = [logits >= 0]``.
    """

    def __init__(self, in_channels: int, stride: int = 1, temperature: float = 1.0, noise: bool = True):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.stride = _positive_int("stride", stride)
        self.temperature = _check_temperature(temperature)
        self.noise = _check_noise(noise)
        self.conv = nn.Conv2d(in_channels, 1, 3, stride, 1, bias=True)
        self.fc = nn.Linear(in_channels, 1)
        self.last_logits: Tensor | None = None

    def logits(self, x: Tensor) -> Tensor:
        """Mask logits ``[B, 1, H', W']`` at the block's output resolution."""
        return self.conv(x) + self.fc(x.mean(dim=(2, 3)))[:, :, None, None]

    @staticmethod
    def decision(logits: Tensor) -> Tensor:
        """The eval decision on logits, bool: ``logits >= 0`` (the compiled engine's ``rows_gate_mask`` is its
        C++ counterpart)."""
        return logits >= 0

    def decide(self, x: Tensor) -> Tensor:
        """The eval-mode mask of input ``x``, bool ``[B, 1, H', W']``."""
        return self.decision(self.logits(x))

    def forward(self, x: Tensor) -> Tensor:
        logits = self.logits(x)
        self.last_logits = logits
        if not self.training:
            return self.decision(logits).to(logits.dtype)
        if self.noise:
            logits = logits + _gumbel_difference_like(logits)
        z = logits / self.temperature
        soft = torch.sigmoid(z)
        # Thresholding z rather than soft avoids sigmoid rounding to 0.5 for tiny negative z.
        hard = (z >= 0).to(soft.dtype)
        # This order keeps the forward value exactly 0 or 1 (hard - s is exact for s in [0.5, 1]).
        return hard - soft.detach() + soft

    def plan_into(self, b, name: str, x: int, stride: int, expand: bool = False) -> int:
        """The eval-mode mask unit in the compiled whole-model plan (``pipeline/ops/plan``), on the rows of
        ``x``, for a block of stride ``stride``: the mask, its dilation and the position lists (with ``expand``
        also the expanded mask on the input grid, ``expand_mask``); returns the gate's index for the gated
        convs."""
        from pipeline.ops.plan.builder import Unsupported

        if self.training or self.stride != stride or stride not in (1, 2):
            raise Unsupported(f"{name}: only an eval-mode mask unit with the block's stride (1 or 2) is compiled")
        b.watch(self.conv.weight, self.conv.bias, self.fc.weight, self.fc.bias)
        return b.rows_gate(x, stride, self.conv.weight, self.conv.bias, self.fc.weight, self.fc.bias, expand)

    @torch.no_grad()
    def init_open(self, bias: float = 3.0) -> None:
        """Make the logits ``bias`` at every position for every input (positive: all positions run)."""
        if not math.isfinite(bias):
            raise ValueError(f"bias must be finite, got {bias!r}")
        self.conv.weight.zero_()
        self.fc.weight.zero_()
        self.conv.bias.fill_(bias)
        self.fc.bias.zero_()

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def macs(self, in_shape: tuple[int, int, int]) -> int:
        """Multiply-accumulates per image for an input of shape ``(C, H, W)``."""
        channels, height, width = in_shape
        if channels != self.in_channels:
            raise ValueError(f"in_shape has {channels} channels, the mask unit expects {self.in_channels}")
        out_h, out_w = self.output_size(height, width)
        return channels * 9 * out_h * out_w + channels

    def __getstate__(self) -> dict:
        return _drop_transient(super().__getstate__())


def dilate(mask: Tensor, kernel_size: int = 3) -> Tensor:
    """Dilate a ``[B, 1, H, W]`` mask with a ``kernel_size`` x ``kernel_size`` window
    (DynConv's mask dilation: the positions a following kxk conv reads)."""
    if _positive_int("kernel_size", kernel_size) % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if kernel_size == 1:
        return mask
    return F.max_pool2d(mask, kernel_size, stride=1, padding=kernel_size // 2)


def expand_mask(mask: Tensor, stride: int, in_size: tuple[int, int]) -> Tensor:
    """The input positions a 3x3 conv with padding 1 and ``stride`` reads for the active outputs of
    ``mask`` ``[B, 1, H', W']``, on an input of spatial size ``in_size``: ``mask[i, j]`` placed at
    ``(stride i, stride j)`` of the input grid, then dilated 3x3 (the official ``ExpandMask``)."""
    if stride == 1:
        return dilate(mask)
    height, width = in_size
    if mask.shape[-2] != (height - 1) // stride + 1 or mask.shape[-1] != (width - 1) // stride + 1:
        raise ValueError(f"a mask of {tuple(mask.shape[-2:])} does not fit a stride-{stride} conv on {in_size}")
    spread = mask.new_zeros(*mask.shape[:-2], height, width)
    spread[..., ::stride, ::stride] = mask
    return dilate(spread)


class GatedBlock(nn.Module):
    """Shared bookkeeping of DynConv-gated residual blocks (Verelst & Tuytelaars, CVPR 2020).

    Subclasses define ``gate`` and the per-output-position MACs run at the
    dilated mask (``dilated_cost``) and at the mask (``masked_cost``), and call
    ``_masks`` in ``forward``. Executed MACs per image:
    ``|dilate(m)| * dilated_cost + |m| * masked_cost`` (the cost term of the sparsity criterion).

    Two training semantics are switches (eval outputs are the same either way):

    - ``dilated_mask_grad``: False (the official code, ``dynconv/maskunit.py``
      ``ExpandMask``): the dilated mask is a boolean without gradient, so the
      cost term's gradient reaches the mask unit through ``|m|`` only. True:
      the dilated mask is a max-pool of the straight-through mask and carries
      gradient.
    - ``mask_conv2_input``: False (the official code, ``models/resnet_util.py``):
      the convs of the branch read unmasked inputs, the mask is applied where
      the residual is added (batch statistics of the inner BNs over every
      position). True: conv2 reads conv1's output times the dilated mask (and
      an inverted residual's projection reads its input times the mask).
    """

    gate: MaskUnit

    def __init__(self) -> None:
        super().__init__()
        self.last_mask: Tensor | None = None
        self.last_dilated: Tensor | None = None
        self._in_size: tuple[int, int] | None = None
        self.dilated_mask_grad = False
        self.mask_conv2_input = False

    @property
    def dilated_cost(self) -> int:
        raise NotImplementedError

    @property
    def masked_cost(self) -> int:
        raise NotImplementedError

    @property
    def shortcut_cost(self) -> int:
        """MACs per output position that run everywhere (a projection shortcut)."""
        return 0

    def _adopt(self, block: nn.Module, names: Sequence[str], open_bias: float) -> GatedBlock:
        """Copy ``block``'s submodules ``names`` into this gated block and open the gate."""
        for name in names:
            setattr(self, name, copy.deepcopy(getattr(block, name)))
        self.gate.init_open(open_bias)
        weight = block.conv1.weight
        self.gate.to(device=weight.device, dtype=weight.dtype)
        return self.train(block.training)

    def dilate_mask(self, mask: Tensor, in_size: tuple[int, int]) -> Tensor:
        """The positions the first conv runs at, for mask ``mask`` of an input of spatial size ``in_size``: the
        3x3 dilation of the mask (at the mask's resolution; a block whose first conv runs at its input's
        resolution overrides this)."""
        return dilate(mask)

    def _masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.gate(x)
        self._in_size = (x.shape[-2], x.shape[-1])
        dilated = self.dilate_mask(mask if self.dilated_mask_grad else mask.detach(), self._in_size)
        self.last_mask, self.last_dilated = mask, dilated
        return mask, dilated

    @property
    def in_size(self) -> tuple[int, int]:
        """Spatial size of the last forward's input."""
        self._require_forward()
        return self._in_size

    def _require_forward(self) -> tuple[Tensor, Tensor]:
        if self.last_mask is None or self.last_dilated is None:
            raise RuntimeError(f"{type(self).__name__}: run a forward pass before asking for its cost")
        return self.last_mask, self.last_dilated

    @property
    def num_positions(self) -> int:
        mask, _ = self._require_forward()
        return mask.shape[-2] * mask.shape[-1]

    @property
    def dense_cost_per_image(self) -> int:
        """MACs of the gated convs when every position runs (the dilated mask's positions at its own resolution)."""
        _, dilated = self._require_forward()
        return dilated.shape[-2] * dilated.shape[-1] * self.dilated_cost + self.num_positions * self.masked_cost

    def executed_cost(self) -> Tensor:
        """MACs per image ``[B]`` of the gated convs under the last masks (differentiable)."""
        mask, dilated = self._require_forward()
        return dilated.sum(dim=(1, 2, 3)) * self.dilated_cost + mask.sum(dim=(1, 2, 3)) * self.masked_cost

    def executed_fraction(self) -> Tensor:
        return self.executed_cost() / self.dense_cost_per_image

    @torch.no_grad()
    def macs_per_image(self) -> Tensor:
        """MACs per image ``[B]`` (float64) of a sparse execution: gate + gated convs + projection shortcut."""
        mask, dilated = self._require_forward()
        # float64: float32 products lose integer precision for wide blocks.
        executed = (
            dilated.double().sum(dim=(1, 2, 3)) * self.dilated_cost
            + mask.double().sum(dim=(1, 2, 3)) * self.masked_cost
        )
        gate = self.gate.macs((self.gate.in_channels, *self._in_size))
        return executed + gate + self.num_positions * self.shortcut_cost

    def counted_macs(self, x: Tensor) -> int:
        """MACs of the forward that just ran (the whole batch), for the MAC counter (``pipeline/complexity.py``)."""
        return int(self.macs_per_image().sum().item())

    def __getstate__(self) -> dict:
        return _drop_transient(super().__getstate__())


class GatedBasicBlock(GatedBlock):
    """ResNet basic block with DynConv spatial gating (Verelst & Tuytelaars, CVPR 2020).

    ``m = gate(x)``, ``d = dilate(m)``; conv1 runs on ``d`` (conv2 reads its 3x3
    neighbourhood), conv2 on ``m``: ``out = relu(shortcut(x) + m * bn2(conv2(relu(bn1(conv1(x))))))``, with
    conv2's input multiplied by ``d`` first when ``mask_conv2_input`` (the same values at the positions of
    ``m``). Submodule names match ``BasicBlock`` so its state dict loads with only ``gate.*`` missing.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        _positive_int("in_ch", in_ch)
        _positive_int("out_ch", out_ch)
        _positive_int("stride", stride)
        dense = BasicBlock(in_ch, out_ch, stride)
        self.conv1, self.bn1, self.conv2, self.bn2 = dense.conv1, dense.bn1, dense.conv2, dense.bn2
        self.relu, self.shortcut = dense.relu, dense.shortcut
        self.gate = MaskUnit(in_ch, stride)

    @classmethod
    def from_block(cls, block: BasicBlock, open_bias: float = 3.0) -> GatedBasicBlock:
        """Gated copy of a dense block with the gate open (every position runs)."""
        if not isinstance(block, BasicBlock):
            raise ValueError(f"from_block expects a BasicBlock, got {type(block).__name__}")
        gated = cls(block.conv1.in_channels, block.conv1.out_channels, block.conv1.stride[0])
        return gated._adopt(block, ("conv1", "bn1", "conv2", "bn2", "relu", "shortcut"), open_bias)

    @property
    def cost_conv1(self) -> int:
        return self.conv1.in_channels * self.conv1.out_channels * 9

    @property
    def cost_conv2(self) -> int:
        return self.conv2.in_channels * self.conv2.out_channels * 9

    @property
    def dilated_cost(self) -> int:
        return self.cost_conv1

    @property
    def masked_cost(self) -> int:
        return self.cost_conv2

    @property
    def shortcut_cost(self) -> int:
        if isinstance(self.shortcut, nn.Identity):
            return 0
        projection = self.shortcut[0]
        return projection.in_channels * projection.out_channels

    def forward(self, x: Tensor) -> Tensor:
        mask, dilated = self._masks(x)
        h = self.relu(self.bn1(self.conv1(x)))
        if self.mask_conv2_input:
            h = h * dilated
        r = self.bn2(self.conv2(h)) * mask
        return self.relu(self.shortcut(x) + r)


class GatedInvertedResidual(GatedBlock):
    """MobileNetV2 inverted residual with DynConv spatial gating (Verelst & Tuytelaars, CVPR 2020).

    Only for blocks with an identity shortcut (stride 1, equal widths).
    ``m = gate(x)``, ``d = dilate(m)``; the 1x1 expansion runs on ``d`` (the
    depthwise 3x3 reads its neighbourhood), the depthwise conv and the 1x1
    projection on ``m``: ``out = x + m * bn3(conv3(act(bn2(conv2(act(bn1(conv1(x))))))))``; with
    ``mask_conv2_input`` the depthwise conv's input is multiplied by ``d`` and the projection's by ``m``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expand: int = 6):
        super().__init__()
        _positive_int("in_ch", in_ch)
        _positive_int("out_ch", out_ch)
        _positive_int("expand", expand)
        if stride != 1 or in_ch != out_ch:
            raise ValueError(
                f"spatial gating needs a residual connection (stride 1, in_ch == out_ch), "
                f"got stride {stride}, {in_ch} -> {out_ch} channels"
            )
        dense = InvertedResidual(in_ch, out_ch, stride, expand)
        self.stride, self.use_res = dense.stride, dense.use_res
        self.conv1, self.bn1, self.conv2, self.bn2 = dense.conv1, dense.bn1, dense.conv2, dense.bn2
        self.conv3, self.bn3, self.act = dense.conv3, dense.bn3, dense.act
        self.gate = MaskUnit(in_ch, 1)

    @classmethod
    def from_block(cls, block: InvertedResidual, open_bias: float = 3.0) -> GatedInvertedResidual:
        """Gated copy of a dense block with the gate open (every position runs)."""
        if not isinstance(block, InvertedResidual):
            raise ValueError(f"from_block expects an InvertedResidual, got {type(block).__name__}")
        if not block.use_res:
            raise ValueError("spatial gating needs an InvertedResidual with a residual connection (use_res)")
        expand = block.conv1.out_channels // block.conv1.in_channels
        gated = cls(block.conv1.in_channels, block.conv3.out_channels, 1, expand)
        return gated._adopt(block, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "act"), open_bias)

    @property
    def cost_conv1(self) -> int:
        return self.conv1.in_channels * self.conv1.out_channels

    @property
    def cost_conv2(self) -> int:
        return self.conv2.out_channels * 9

    @property
    def cost_conv3(self) -> int:
        return self.conv3.in_channels * self.conv3.out_channels

    @property
    def dilated_cost(self) -> int:
        return self.cost_conv1

    @property
    def masked_cost(self) -> int:
        return self.cost_conv2 + self.cost_conv3

    def forward(self, x: Tensor) -> Tensor:
        mask, dilated = self._masks(x)
        h1 = self.act(self.bn1(self.conv1(x)))
        h2 = self.act(self.bn2(self.conv2(h1 * dilated if self.mask_conv2_input else h1)))
        r = self.bn3(self.conv3(h2 * mask if self.mask_conv2_input else h2)) * mask
        return x + r


def gated_blocks(model: nn.Module) -> list[GatedBlock]:
    """The gated blocks of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, GatedBlock)]


def set_gumbel(model: nn.Module, temperature: float | None = None, noise: bool | None = None) -> int:
    """Set the Gumbel temperature and/or noise flag of every ``MaskUnit`` in ``model``;
    returns how many units were set."""
    if temperature is not None:
        temperature = _check_temperature(temperature)
    if noise is not None:
        noise = _check_noise(noise)
    units = [m for m in model.modules() if isinstance(m, MaskUnit)]
    for unit in units:
        if temperature is not None:
            unit.temperature = temperature
        if noise is not None:
            unit.noise = noise
    return len(units)


class BudgetLoss(nn.Module):
    """DynConv sparsity criterion (Verelst & Tuytelaars, CVPR 2020): network and per-block budget terms.

    ``budget_network = weight * (sum_b C_b / sum_b D_b - budget)^2`` with executed
    MACs ``C_b`` (batch mean) and dense MACs ``D_b`` of block b, and
    ``budget_block = weight * mean_b[relu(f_b - upper_b)^2 + relu(lower_b - f_b)^2]``
    on each block's executed fraction ``f_b``. The block bounds start at
    ``[budget_b, budget_b]`` and widen to ``[0, 1]`` over the first
    ``anneal_fraction`` of training with a cos^2 schedule.

    ``block_budgets`` (one per block, default: ``budget`` for all) lets a search
    give stages their own targets; it then also adds ``budget_stage = weight *
    mean_g (sum_{b in g} C_b / sum_{b in g} D_b - budget_g)^2`` over the groups
    of blocks sharing a target, a network-style term per stage that keeps
    acting after the block bounds have relaxed.
    """

    def __init__(
        self,
        budget: float,
        weight: float = 10.0,
        anneal_fraction: float = 1 / 3,
        block_budgets: Sequence[float] | None = None,
    ):
        super().__init__()
        if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
            raise ValueError(f"budget must be in (0, 1], got {budget!r}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if not (isinstance(anneal_fraction, (int, float)) and 0 < anneal_fraction <= 1):
            raise ValueError(f"anneal_fraction must be in (0, 1], got {anneal_fraction!r}")
        if block_budgets is not None:
            block_budgets = [float(b) for b in block_budgets]
            if not block_budgets or not all(0 < b <= 1 for b in block_budgets):
                raise ValueError(f"block_budgets must be a non-empty list of values in (0, 1], got {block_budgets!r}")
        self.budget, self.weight, self.anneal_fraction = float(budget), float(weight), float(anneal_fraction)
        self.block_budgets = block_budgets

    def bounds(self, progress: float, budget: float | None = None) -> tuple[float, float]:
        """Per-block ``(lower, upper)`` executed-fraction bounds at ``progress`` in [0, 1]."""
        if not (isinstance(progress, (int, float)) and 0 <= progress <= 1):
            raise ValueError(f"progress must be in [0, 1], got {progress!r}")
        budget = self.budget if budget is None else budget
        a = math.cos(min(1.0, progress / self.anneal_fraction) * math.pi / 2) ** 2
        return a * budget, 1 - a * (1 - budget)

    def forward(self, blocks: Sequence[GatedBlock], progress: float) -> dict[str, Tensor]:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("BudgetLoss needs at least one gated block")
        targets = self.block_budgets or [self.budget] * len(blocks)
        if len(targets) != len(blocks):
            raise ValueError(f"BudgetLoss has {len(targets)} block budgets for {len(blocks)} blocks")
        bounds = torch.tensor([self.bounds(progress, b) for b in targets])
        # over the global batch under data parallelism: every rank computes the same criterion
        executed = mean_across_ranks(torch.stack([b.executed_cost().mean() for b in blocks]))
        dense = torch.tensor([float(b.dense_cost_per_image) for b in blocks], dtype=executed.dtype)
        fractions = executed / dense
        network = (executed.sum() / dense.sum() - self.budget) ** 2
        block = (F.relu(fractions - bounds[:, 1]) ** 2 + F.relu(bounds[:, 0] - fractions) ** 2).mean()
        out = {"budget_network": self.weight * network, "budget_block": self.weight * block}
        if self.block_budgets is not None:
            groups = sorted(set(targets))
            stage = torch.stack([
                (executed[[i for i, t in enumerate(targets) if t == g]].sum()
                 / dense[[i for i, t in enumerate(targets) if t == g]].sum() - g) ** 2
                for g in groups
            ])  # fmt: skip
            out["budget_stage"] = self.weight * stage.mean()
        return out
