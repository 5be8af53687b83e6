"""DynConv spatial gating: equivalence with the dense blocks, a per-position
reference of the masked execution, Gumbel masks, MAC accounting, budget loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.cifar_mobilenetv2 import InvertedResidual
from pipeline.models.cifar_resnet import BasicBlock, CifarResNet
from pipeline.ops.spatial_gate import (
    BudgetLoss,
    GatedBasicBlock,
    GatedInvertedResidual,
    MaskUnit,
    dilate,
    gated_blocks,
    set_gumbel,
)

torch.set_num_threads(1)

ATOL = 1e-5


def randomize_bn(module: nn.Module) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval BN is not the identity."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)


def dense_blocks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    blocks = {
        "basic_identity": BasicBlock(4, 4, 1),
        "basic_projection": BasicBlock(4, 6, 2),
        "inverted_residual": InvertedResidual(4, 4, 1, 3),
    }
    for block in blocks.values():
        randomize_bn(block)
        block.eval()
    return blocks


def gated_from(block: nn.Module, open_bias: float = 3.0) -> nn.Module:
    cls = GatedBasicBlock if isinstance(block, BasicBlock) else GatedInvertedResidual
    return cls.from_block(block, open_bias)


def force_mask(block: nn.Module, mask: torch.Tensor) -> None:
    """Make the block's gate return ``mask`` whatever its input."""
    block.gate.forward = lambda x: mask


def random_mask(batch: int, height: int, width: int, fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    active = round(fraction * height * width)
    mask = torch.zeros(batch, height * width)
    for b in range(batch):
        mask[b, torch.randperm(height * width, generator=g)[:active]] = 1.0
    return mask.view(batch, 1, height, width)


# ---------------------------------------------------------------------------
# Per-position reference: evaluates each conv only where a sparse execution
# would, one output position at a time, with explicit sums and eval-mode BN.


def bn_at(bn: nn.BatchNorm2d, v: torch.Tensor) -> torch.Tensor:
    return (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def conv3x3_at(weight: torch.Tensor, x: torch.Tensor, i: int, j: int, stride: int) -> torch.Tensor:
    """Dense 3x3 conv (padding 1) output vector at output position (i, j)."""
    out = torch.zeros(weight.shape[0])
    for ki in range(3):
        for kj in range(3):
            p, q = i * stride - 1 + ki, j * stride - 1 + kj
            if 0 <= p < x.shape[1] and 0 <= q < x.shape[2]:
                out += weight[:, :, ki, kj] @ x[:, p, q]
    return out


def neighbours(i: int, j: int, height: int, width: int):
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if 0 <= i + di < height and 0 <= j + dj < width:
                yield di, dj


def reference_basic(block: BasicBlock, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Output vector at (i, j) of one image x [C, H, W] when the residual runs there."""
    stride = block.conv1.stride[0]
    out_h, out_w = (x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1
    conv2 = torch.zeros(block.conv2.out_channels)
    for di, dj in neighbours(i, j, out_h, out_w):  # conv1 only where conv2 reads
        h = torch.relu(bn_at(block.bn1, conv3x3_at(block.conv1.weight, x, i + di, j + dj, stride)))
        conv2 += block.conv2.weight[:, :, di + 1, dj + 1] @ h
    return torch.relu(shortcut_at(block, x, i, j) + bn_at(block.bn2, conv2))


def shortcut_at(block: BasicBlock, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    if isinstance(block.shortcut, nn.Identity):
        return x[:, i, j]
    stride = block.conv1.stride[0]
    conv, bn = block.shortcut
    return bn_at(bn, conv.weight[:, :, 0, 0] @ x[:, i * stride, j * stride])


def reference_inverted(block: InvertedResidual, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    depthwise = torch.zeros(block.conv2.out_channels)
    for di, dj in neighbours(i, j, x.shape[1], x.shape[2]):  # expansion only where the depthwise conv reads
        h1 = torch.clamp(bn_at(block.bn1, block.conv1.weight[:, :, 0, 0] @ x[:, i + di, j + dj]), 0, 6)
        depthwise += block.conv2.weight[:, 0, di + 1, dj + 1] * h1
    h2 = torch.clamp(bn_at(block.bn2, depthwise), 0, 6)
    return x[:, i, j] + bn_at(block.bn3, block.conv3.weight[:, :, 0, 0] @ h2)


def inactive_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full-map output of a block whose residual runs nowhere."""
    if isinstance(block, BasicBlock):
        return torch.relu(block.shortcut(x))  # not block.relu: it is in place and x may be the shortcut
    return x


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["basic_identity", "basic_projection", "inverted_residual"])
def test_open_gate_matches_dense_block(name):
    dense = dense_blocks()[name]
    gated = gated_from(dense).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected, got = dense(x), gated(x)
    assert gated.last_mask.min().item() == 1.0
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    # The gated block does not share storage with the dense one.
    assert gated.conv1.weight.data_ptr() != dense.conv1.weight.data_ptr()


@pytest.mark.parametrize("name", ["basic_identity", "basic_projection", "inverted_residual"])
def test_dense_state_dict_loads_with_only_gate_keys_missing(name):
    dense = dense_blocks()[name]
    fresh = {
        "basic_identity": lambda: GatedBasicBlock(4, 4, 1),
        "basic_projection": lambda: GatedBasicBlock(4, 6, 2),
        "inverted_residual": lambda: GatedInvertedResidual(4, 4, 1, 3),
    }[name]()
    missing, unexpected = fresh.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == ["gate.conv.bias", "gate.conv.weight", "gate.fc.bias", "gate.fc.weight"]
    assert torch.equal(fresh.conv2.weight, dense.conv2.weight)


def test_converted_resnet_matches_dense_and_lists_blocks_in_order():
    torch.manual_seed(1)
    dense = CifarResNet(depth=8, width=0.25, in_channels=1, num_classes=3)
    randomize_bn(dense)
    dense.eval()
    gated = copy.deepcopy(dense)
    for stage in (gated.layer1, gated.layer2, gated.layer3):
        stage[0] = GatedBasicBlock.from_block(stage[0])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), dense(x), rtol=0, atol=ATOL)
    blocks = gated_blocks(gated)
    assert blocks == [gated.layer1[0], gated.layer2[0], gated.layer3[0]]
    assert [b.last_mask.shape[-1] for b in blocks] == [16, 8, 4]


@pytest.mark.parametrize("name", ["basic_identity", "basic_projection", "inverted_residual"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
def test_masked_forward_matches_per_position_reference(name, fraction):
    dense = dense_blocks()[name]
    gated = gated_from(dense).eval()
    torch.manual_seed(2)
    x = torch.randn(2, 4, 8, 8)
    stride = dense.conv1.stride[0]
    out_h = out_w = 8 // stride
    mask = random_mask(2, out_h, out_w, fraction, seed=int(fraction * 100))
    force_mask(gated, mask)
    reference = reference_basic if isinstance(dense, BasicBlock) else reference_inverted
    with torch.no_grad():
        out = gated(x)
        skipped = inactive_output(dense, x)
        for b in range(2):
            for i in range(out_h):
                for j in range(out_w):
                    if mask[b, 0, i, j]:
                        torch.testing.assert_close(out[b, :, i, j], reference(dense, x[b], i, j), rtol=0, atol=ATOL)
                    else:
                        assert torch.equal(out[b, :, i, j], skipped[b, :, i, j])
    assert torch.equal(gated.last_mask, mask)
    assert torch.equal(gated.last_dilated, dilate(mask))


def test_dilate_by_hand():
    mask = torch.zeros(1, 1, 5, 5)
    mask[0, 0, 0, 0] = mask[0, 0, 2, 3] = 1
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 0:2, 0:2] = 1
    expected[0, 0, 1:4, 2:5] = 1
    assert torch.equal(dilate(mask), expected)
    assert torch.equal(dilate(mask, 1), mask)
    # 5x5: rows 0-4 x cols 1-4 around (2, 3), plus col 0 of rows 0-2 from the corner.
    assert dilate(mask, 5).sum().item() == 20 + 3


# ---------------------------------------------------------------------------
# Mask unit


def test_mask_unit_eval_is_deterministic_threshold():
    torch.manual_seed(3)
    unit = MaskUnit(4, stride=2).eval()
    x = torch.randn(3, 4, 9, 9)
    first, second = unit(x), unit(x)
    assert first.shape == (3, 1, 5, 5)
    assert torch.equal(first, second)
    assert torch.equal(first, (unit.last_logits >= 0).float())
    assert 0 < first.mean().item() < 1  # a random unit gives a mixed mask


def test_mask_unit_training_mask_is_binary_with_straight_through_gradient():
    torch.manual_seed(4)
    unit = MaskUnit(4).train()
    x = torch.randn(2, 4, 8, 8)
    mask = unit(x)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.mean().item() < 1
    (mask * torch.randn_like(mask)).sum().backward()
    for p in (unit.conv.weight, unit.conv.bias, unit.fc.weight, unit.fc.bias):
        assert p.grad is not None and p.grad.abs().sum().item() > 0


def test_mask_unit_noise_follows_global_seed_and_can_be_switched_off():
    unit = MaskUnit(4).train()
    x = torch.randn(2, 4, 16, 16)
    torch.manual_seed(5)
    a = unit(x)
    torch.manual_seed(5)
    b = unit(x)
    c = unit(x)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)
    unit.noise = False
    assert torch.equal(unit(x), (unit.last_logits >= 0).float())


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_mask_unit_noise_rate(temperature):
    # With constant logits l, g1 - g2 is logistic: P(active) = sigmoid(l) for any temperature.
    unit = MaskUnit(2, temperature=temperature).train()
    unit.init_open(1.0)
    torch.manual_seed(6)
    rate = unit(torch.randn(4, 2, 64, 64)).mean().item()
    assert abs(rate - 1 / (1 + math.exp(-1.0))) < 0.02  # std of the estimate ~0.0035


def test_init_open_gives_constant_logits():
    unit = MaskUnit(4, stride=2)
    unit.init_open(2.5)
    unit(torch.randn(2, 4, 7, 7))
    assert torch.allclose(unit.last_logits, torch.full((2, 1, 4, 4), 2.5))
    unit.init_open(-1.0)
    assert unit.eval()(torch.randn(1, 4, 7, 7)).sum().item() == 0


def test_deepcopy_after_training_forward():
    gated = gated_from(dense_blocks()["basic_identity"]).train()
    gated(torch.randn(2, 4, 8, 8))
    clone = copy.deepcopy(gated)
    assert clone.last_mask is None and clone.gate.last_logits is None
    assert torch.equal(clone.conv1.weight, gated.conv1.weight)


# ---------------------------------------------------------------------------
# MAC accounting


def flop_counter_macs(module: nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // 2 / x.shape[0]


@pytest.mark.parametrize("name", ["basic_identity", "basic_projection", "inverted_residual"])
def test_macs_all_active_equal_dense_plus_gate(name):
    dense = dense_blocks()[name]
    gated = gated_from(dense).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        gated(x)
    gate_macs = gated.gate.macs((4, 8, 8))
    out_hw = (8 // dense.conv1.stride[0]) ** 2
    assert gate_macs == 4 * 9 * out_hw + 4
    assert flop_counter_macs(gated.gate, x) == gate_macs
    expected = flop_counter_macs(dense, x) + gate_macs
    macs = gated.macs_per_image()
    assert macs.shape == (2,)
    assert torch.allclose(macs, torch.full((2,), expected, dtype=torch.float64), rtol=0.01)
    assert torch.equal(gated.executed_fraction(), torch.ones(2))


@pytest.mark.parametrize("name", ["basic_identity", "basic_projection", "inverted_residual"])
def test_macs_no_active_position_count_gate_and_projection_only(name):
    dense = dense_blocks()[name]
    gated = gated_from(dense, open_bias=-3.0).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        gated(x)
    out_hw = (8 // dense.conv1.stride[0]) ** 2
    projection = 4 * 6 * out_hw if name == "basic_projection" else 0
    assert gated.macs_per_image().tolist() == [gated.gate.macs((4, 8, 8)) + projection] * 2
    assert gated.executed_fraction().tolist() == [0.0, 0.0]


def test_macs_hand_made_mask_basic_block():
    gated = gated_from(dense_blocks()["basic_projection"]).eval()  # 4 -> 6 channels, stride 2: 4x4 output
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 0, 0] = 1  # corner: dilated 2x2
    mask[1, 0, 1, 1] = mask[1, 0, 3, 3] = 1  # interior 3x3 plus corner 2x2, overlapping at (2, 2)
    force_mask(gated, mask)
    with torch.no_grad():
        gated(torch.randn(2, 4, 8, 8))
    cost1, cost2 = 4 * 6 * 9, 6 * 6 * 9
    assert (gated.cost_conv1, gated.cost_conv2) == (cost1, cost2)
    assert gated.dense_cost_per_image == 16 * (cost1 + cost2)
    fixed = gated.gate.macs((4, 8, 8)) + 4 * 6 * 16
    assert gated.macs_per_image().tolist() == [fixed + 4 * cost1 + cost2, fixed + 12 * cost1 + 2 * cost2]
    expected_fraction = torch.tensor([4 * cost1 + cost2, 12 * cost1 + 2 * cost2]) / (16 * (cost1 + cost2))
    torch.testing.assert_close(gated.executed_fraction(), expected_fraction)


def test_macs_hand_made_mask_inverted_residual():
    gated = gated_from(dense_blocks()["inverted_residual"]).eval()  # 4 -> hidden 12 -> 4
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 4, 4] = 1
    force_mask(gated, mask)
    with torch.no_grad():
        gated(torch.randn(1, 4, 8, 8))
    assert (gated.cost_conv1, gated.cost_conv2, gated.cost_conv3) == (48, 108, 48)
    assert gated.macs_per_image().tolist() == [gated.gate.macs((4, 8, 8)) + 9 * 48 + 108 + 48]


def test_costs_need_a_forward_first():
    with pytest.raises(RuntimeError, match="forward"):
        GatedBasicBlock(4, 4).macs_per_image()


# ---------------------------------------------------------------------------
# Budget loss


def masked_blocks(masks: list[torch.Tensor]) -> list[GatedBasicBlock]:
    """Identity basic blocks (4 channels, 8x8) run once under the given masks."""
    blocks = []
    for mask in masks:
        block = GatedBasicBlock(4, 4).eval()
        force_mask(block, mask)
        with torch.no_grad():
            block(torch.randn(mask.shape[0], 4, 8, 8))
        blocks.append(block)
    return blocks


def test_budget_loss_zero_on_budget():
    full, empty = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    loss = BudgetLoss(1.0)(masked_blocks([full, full]), progress=0.0)
    assert loss["budget_network"].item() == 0 and loss["budget_block"].item() == 0
    # Network at exactly half (one block all on, one all off); block bounds are [0, 1] after the annealing.
    blocks = masked_blocks([full, empty])
    loss = BudgetLoss(0.5, anneal_fraction=0.25)(blocks, progress=0.25)
    assert loss["budget_network"].item() == 0 and loss["budget_block"].item() == 0
    # At the start the bounds are [0.5, 0.5]: both blocks are 0.5 away.
    loss = BudgetLoss(0.5, weight=10.0)(blocks, progress=0.0)
    assert loss["budget_network"].item() == 0
    assert loss["budget_block"].item() == pytest.approx(10.0 * 0.25)


def test_budget_loss_network_term_on_hand_made_masks():
    a = torch.zeros(2, 1, 8, 8)
    a[0, 0, 0, 0] = 1  # image 0: |d| = 4, |m| = 1; image 1: nothing
    b = torch.zeros(2, 1, 8, 8)
    b[:, 0, 4, 4] = 1  # both images: |d| = 9, |m| = 1
    blocks = masked_blocks([a, b])
    cost = 4 * 4 * 9  # conv1 and conv2 per position
    executed = ((4 + 1) * cost + 0) / 2 + (9 + 1) * cost  # batch mean per block, summed
    fraction = executed / (2 * 64 * 2 * cost)
    loss = BudgetLoss(0.3, weight=2.0)(blocks, progress=1.0)
    assert loss["budget_network"].item() == pytest.approx(2.0 * (fraction - 0.3) ** 2, rel=1e-6)
    assert loss["budget_block"].item() == 0  # fractions within [0, 1] after annealing
    # Block term at the start: both fractions are below 0.3.
    loss = BudgetLoss(0.3, weight=2.0)(blocks, progress=0.0)
    f_a, f_b = 2.5 / 128, 10 / 128
    assert loss["budget_block"].item() == pytest.approx(2.0 * ((0.3 - f_a) ** 2 + (0.3 - f_b) ** 2) / 2, rel=1e-6)


def test_budget_loss_bounds_anneal():
    loss = BudgetLoss(0.4, anneal_fraction=0.5)
    assert loss.bounds(0.0) == pytest.approx((0.4, 0.4))
    assert loss.bounds(0.25) == pytest.approx((0.2, 0.7))  # cos^2(pi/4) = 1/2
    assert loss.bounds(0.5) == pytest.approx((0.0, 1.0))
    assert loss.bounds(1.0) == pytest.approx((0.0, 1.0))


def test_budget_loss_gradient_reaches_gates():
    torch.manual_seed(7)
    model = nn.Sequential(GatedBasicBlock(4, 4), GatedBasicBlock(4, 8, 2), GatedInvertedResidual(8, 8, 1, 2)).train()
    model(torch.randn(2, 4, 8, 8))
    loss = BudgetLoss(0.2)(gated_blocks(model), progress=0.0)
    (loss["budget_network"] + loss["budget_block"]).backward()
    for block in gated_blocks(model):
        assert block.gate.conv.weight.grad.abs().sum().item() > 0
        assert block.gate.fc.bias.grad.abs().item() > 0


# ---------------------------------------------------------------------------
# Settings and argument checks


def test_set_gumbel_sets_every_unit():
    model = nn.Sequential(GatedBasicBlock(4, 4), GatedInvertedResidual(4, 4, 1, 2), MaskUnit(4))
    assert set_gumbel(model, temperature=0.25) == 3
    units = [m for m in model.modules() if isinstance(m, MaskUnit)]
    assert [(u.temperature, u.noise) for u in units] == [(0.25, True)] * 3
    set_gumbel(model, noise=False)
    assert [(u.temperature, u.noise) for u in units] == [(0.25, False)] * 3


@pytest.mark.parametrize(
    "call",
    [
        lambda: MaskUnit(0),
        lambda: MaskUnit(4, stride=0),
        lambda: MaskUnit(4, temperature=0.0),
        lambda: set_gumbel(nn.Sequential(MaskUnit(4)), temperature=-1.0),
        lambda: set_gumbel(nn.Sequential(MaskUnit(4)), temperature=float("nan")),
        lambda: set_gumbel(nn.Sequential(MaskUnit(4)), noise="yes"),
        lambda: MaskUnit(4).macs((3, 8, 8)),
        lambda: dilate(torch.zeros(1, 1, 4, 4), 2),
        lambda: GatedInvertedResidual(4, 8, 1, 6),
        lambda: GatedInvertedResidual(4, 4, 2, 6),
        lambda: GatedInvertedResidual.from_block(InvertedResidual(4, 4, 2, 6)),
        lambda: GatedInvertedResidual.from_block(BasicBlock(4, 4)),
        lambda: GatedBasicBlock.from_block(InvertedResidual(4, 4, 1, 6)),
        lambda: BudgetLoss(0.0),
        lambda: BudgetLoss(1.5),
        lambda: BudgetLoss(0.5, weight=-1.0),
        lambda: BudgetLoss(0.5, anneal_fraction=0.0),
        lambda: BudgetLoss(0.5).bounds(1.5),
        lambda: BudgetLoss(0.5)([], progress=0.5),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_budget_loss_block_budgets_add_a_stage_term():
    torch.manual_seed(0)
    blocks = [GatedBasicBlock(4, 4).eval() for _ in range(3)]
    x = torch.randn(2, 4, 8, 8)
    for b in blocks:
        b(x)
    fractions = [b.executed_fraction().mean().item() for b in blocks]
    crit = BudgetLoss(0.5, weight=2.0, block_budgets=[0.2, 0.2, 0.9])
    out = crit(blocks, progress=1.0)
    executed = [b.executed_cost().mean().item() for b in blocks]
    dense = [float(b.dense_cost_per_image) for b in blocks]
    stage_a = (sum(executed[:2]) / sum(dense[:2]) - 0.2) ** 2
    stage_b = (fractions[2] - 0.9) ** 2
    assert out["budget_stage"].item() == pytest.approx(2.0 * (stage_a + stage_b) / 2, rel=1e-5)
    plain = BudgetLoss(0.5, weight=2.0)(blocks, progress=0.0)
    assert "budget_stage" not in plain
    # At progress 0 the block bounds pin each block to its own budget.
    tight = crit(blocks, progress=0.0)["budget_block"].item()
    expected = sum((f - b) ** 2 for f, b in zip(fractions, [0.2, 0.2, 0.9])) / 3
    assert tight == pytest.approx(2.0 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="block budgets"):
        BudgetLoss(0.5, block_budgets=[0.5, 0.5])(blocks, progress=0.0)
    with pytest.raises(ValueError, match="block_budgets"):
        BudgetLoss(0.5, block_budgets=[0.0])
