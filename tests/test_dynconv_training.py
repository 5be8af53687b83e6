"""DynConv trains as the official code (thomasverelst/dynconv, classification) by default, and each of the
project's earlier choices is a switch that changes the training step.

The reference is the official training step written out by hand for a two-block toy network: the
mask unit's Gumbel straight-through mask (``dynconv/maskunit.py``), the dilated mask as a boolean without
gradient (``ExpandMask``), the branch computed on unmasked inputs and masked where the residual is added
(``models/resnet_util.py``), the sparsity criterion with per-epoch bounds (``dynconv/loss.py``) weighted
10 (``main_cifar.py``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import methods
from pipeline.methods.dynconv import gumbel_noise
from pipeline.models.cifar_resnet import BasicBlock
from pipeline.ops.spatial_gate import GatedBasicBlock, gated_blocks, set_gumbel

from .conftest import method_params

EPOCHS, EPOCH, BUDGET = 6, 1, 0.2


class Toy(nn.Module):
    """stem -> gated block (8 -> 8) -> gated block (8 -> 16, stride 2, projection) -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.block1 = BasicBlock(8, 8, 1)
        self.block2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


MOSTLY_OPEN, MOSTLY_SHUT = 0.6, -1.2  # gate biases: about 80 % / 20 % of the positions execute


def toy(p, bias: float = MOSTLY_OPEN) -> nn.Module:
    torch.manual_seed(0)
    model = Toy()
    methods.get("dynconv").convert(model, p, seed=0)
    with torch.no_grad():  # gates that vary over positions and samples
        for block in gated_blocks(model):
            block.gate.conv.weight.normal_(0.0, 0.3)
            block.gate.conv.bias.fill_(bias)
            block.gate.fc.weight.normal_(0.0, 0.3)
    return model.train()


def official_block(block: GatedBasicBlock, x: torch.Tensor):
    """One sparse BasicBlock of the official classification code; returns (output, mask, dilated mask, costs)."""
    g = block.gate
    logits = F.conv2d(x, g.conv.weight, g.conv.bias, stride=g.stride, padding=1)
    logits = logits + F.linear(x.mean((2, 3)), g.fc.weight, g.fc.bias).view(-1, 1, 1, 1)
    soft = torch.sigmoid(logits / g.temperature)  # no Gumbel noise here (the step under test)
    hard = ((soft >= 0.5).float() - soft).detach() + soft
    dilate = F.conv2d(hard.detach(), torch.ones(1, 1, 3, 3), padding=1) > 0.5  # a boolean, no gradient
    identity = block.shortcut(x)
    out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))  # on unmasked inputs
    out = block.relu(identity + out * hard)
    flops1 = block.conv1.weight.numel()
    flops2 = block.conv2.weight.numel()
    cost = dilate.sum() * flops1 + hard.sum() * flops2
    total = hard.numel() * (flops1 + flops2)
    return out, cost, total


def official_loss(model: Toy, x, y, epoch: int):
    """Task loss + 10 * SparsityCriterion (dynconv/loss.py), bounds from the epoch."""
    h = F.relu(model.stem(x))
    costs = []
    for block in (model.block1, model.block2):
        h, c, t = official_block(block, h)
        costs.append((c, t))
    logits = model.fc(h.mean((2, 3)))
    p = epoch / (0.33 * EPOCHS)
    progress = math.cos(min(max(p, 0), 1) * (math.pi / 2)) ** 2
    upper, lower = 1 - progress * (1 - BUDGET), progress * BUDGET
    block_loss = sum(torch.relu(c / t - upper) ** 2 + torch.relu(lower - c / t) ** 2 for c, t in costs) / len(costs)
    perc = sum(c for c, _ in costs) / sum(t for _, t in costs)
    return F.cross_entropy(logits, y) + 10 * ((perc - BUDGET) ** 2 + block_loss)


def pipeline_loss(model: Toy, p, x, y, epoch: int, step: int, steps: int):
    """The training engine's step for the same batch: the method's hooks, progress as fit() computes it."""
    hooks = methods.get("dynconv").gate_hooks(model, p, EPOCHS, None, x)
    hooks.epoch_start(epoch)
    set_gumbel(model, noise=False)
    logits = model(x)
    progress = (epoch + step / steps) / EPOCHS
    return F.cross_entropy(logits, y) + sum(hooks.extra_loss(model, x, logits, y, progress).values())


def gate_grads(model: Toy, loss) -> list[torch.Tensor]:
    params = [q for b in gated_blocks(model) for q in b.gate.parameters()]
    return torch.autograd.grad(loss, params)


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((u - v).norm() / v.norm()).item() for u, v in zip(a, b))


def params_with(**switches):
    return method_params("dynconv", {"budget": BUDGET, "budget_weight": 10.0, "anneal_fraction": 0.33,
                                     "gumbel_temperature": 1.0, "distill": {"weight": 0.0}, **switches})


BATCH = (torch.randn(6, 1, 12, 12, generator=torch.Generator().manual_seed(1)),
         torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(2)))


def test_defaults_are_the_official_semantics():
    p = method_params("dynconv")
    assert (p.dilated_mask_grad, p.mask_conv2_input, p.anneal_per) == (False, False, "epoch")
    # the official noise-off rule, with the last 2 of the 6 default epochs noise-free (params.yaml says why)
    assert [gumbel_noise(e, p.train.epochs, p.noise_off_fraction) for e in range(p.train.epochs)] == [True] * 4 + [False] * 2


@pytest.mark.parametrize("bias", [MOSTLY_OPEN, MOSTLY_SHUT])
def test_mask_unit_gradients_equal_the_official_training_step(bias):
    p = params_with()
    model = toy(p, bias)
    x, y = BATCH
    ours = gate_grads(model, pipeline_loss(model, p, x, y, EPOCH, step=5, steps=10))
    reference = copy.deepcopy(model)
    ref = gate_grads(reference, official_loss(reference, x, y, EPOCH))
    assert all(r.abs().sum() > 0 for r in ref)
    assert rel_diff(ours, ref) < 1e-5


@pytest.mark.parametrize("switch, bias", [
    ({"dilated_mask_grad": True}, MOSTLY_OPEN),
    ({"mask_conv2_input": True}, MOSTLY_SHUT),  # a dilated mask with holes, so masking conv2's input matters
    ({"anneal_per": "step"}, MOSTLY_OPEN),  # executed fractions between the per-epoch and the per-step upper bound
])
def test_each_variant_changes_the_mask_unit_gradients(switch, bias):
    x, y = BATCH
    official = params_with()
    model = toy(official, bias)
    reference = gate_grads(model, pipeline_loss(model, official, x, y, EPOCH, step=5, steps=10))
    p = params_with(**switch)
    variant = toy(p, bias)
    grads = gate_grads(variant, pipeline_loss(variant, p, x, y, EPOCH, step=5, steps=10))
    assert rel_diff(grads, reference) > 0.01


def test_variant_switches_reach_the_blocks():
    model = toy(params_with(dilated_mask_grad=True, mask_conv2_input=True))
    assert all(b.dilated_mask_grad and b.mask_conv2_input for b in gated_blocks(model))
    assert not any(b.dilated_mask_grad or b.mask_conv2_input for b in gated_blocks(toy(params_with())))


def test_eval_outputs_do_not_depend_on_the_switches():
    x, _ = BATCH
    a, b = toy(params_with()).eval(), toy(params_with(dilated_mask_grad=True, mask_conv2_input=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("epochs, fraction, noisy", [
    (6, 0.2, [True] * 5 + [False]),  # official: epoch > 0.8 E
    (10, 0.2, [True] * 9 + [False]),
    (350, 0.2, [True] * 281 + [False] * 69),  # the official CIFAR run
    (6, 0.34, [True] * 4 + [False] * 2),  # the project's earlier default: the last third
    (1, 0.2, [True]),
])
def test_gumbel_noise_schedule(epochs, fraction, noisy):
    assert [gumbel_noise(e, epochs, fraction) for e in range(epochs)] == noisy
