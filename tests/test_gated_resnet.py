"""DynConv's gating of torchvision's ResNet blocks (pipeline/ops/gated_resnet.py) against dense-masked
computations written out here, and its MAC count against the per-conv formula."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline import methods
from pipeline.complexity import count_macs
from pipeline.config import load_config
from pipeline.models import build_model, model_cfg
from pipeline.ops.gated_resnet import GatedBottleneck, GatedResNetBasicBlock, expand_mask
from pipeline.ops.sparse_exec import to_sparse_execution
from pipeline.ops.spatial_gate import gated_blocks
from pipeline.paths import repo_root


def reads(mask: torch.Tensor, stride: int, in_size: tuple[int, int]) -> torch.Tensor:
    """Per-position loop: the input positions a 3x3, padding-1 conv with ``stride`` reads for the active
    outputs of ``mask``."""
    out = torch.zeros(*mask.shape[:-2], *in_size, dtype=torch.bool)
    for n in range(mask.shape[0]):
        for i in range(mask.shape[-2]):
            for j in range(mask.shape[-1]):
                if mask[n, 0, i, j]:
                    for y in range(stride * i - 1, stride * i + 2):
                        for x in range(stride * j - 1, stride * j + 2):
                            if 0 <= y < in_size[0] and 0 <= x < in_size[1]:
                                out[n, 0, y, x] = True
    return out


@pytest.mark.parametrize(("stride", "size"), [(1, (7, 9)), (2, (8, 8)), (2, (7, 10)), (2, (1, 3))])
def test_expand_mask_marks_exactly_the_inputs_a_strided_conv_reads(stride, size):
    gen = torch.Generator().manual_seed(stride * 31 + size[0])
    out = ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    mask = (torch.rand(3, 1, *out, generator=gen) < 0.3).float()
    assert torch.equal(expand_mask(mask, stride, size) > 0, reads(mask, stride, size))


def test_expand_mask_refuses_a_mask_of_another_size():
    with pytest.raises(ValueError, match="does not fit"):
        expand_mask(torch.ones(1, 1, 5, 5), 2, (8, 8))


def random_gate(block, gen: torch.Generator) -> None:
    with torch.no_grad():
        block.gate.conv.weight.normal_(0.0, 0.5, generator=gen)
        block.gate.conv.bias.fill_(-0.2)
        block.gate.fc.weight.normal_(0.0, 0.2, generator=gen)


def randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.0, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)


def downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def dense_masked(block, x: torch.Tensor) -> torch.Tensor:
    """relu(shortcut + mask * residual branch), every conv over the whole map, from the dense modules."""
    mask = block.gate.decide(x).float()
    identity = x if block.downsample is None else block.downsample(x)
    h = torch.relu(block.bn1(block.conv1(x)))
    if isinstance(block, GatedBottleneck):
        h = torch.relu(block.bn2(block.conv2(h)))
        return torch.relu(identity + mask * block.bn3(block.conv3(h)))
    return torch.relu(identity + mask * block.bn2(block.conv2(h)))


CASES = [("basic", 16, 16, 1), ("basic", 16, 32, 2), ("bottleneck", 64, 4, 1), ("bottleneck", 32, 8, 2)]


def make(kind: str, cin: int, planes: int, stride: int, gen: torch.Generator):
    if kind == "basic":
        dense = BasicBlock(cin, planes, stride, downsample(cin, planes, stride))
        gated = GatedResNetBasicBlock.from_block(dense)
    else:
        dense = Bottleneck(cin, planes, stride, downsample(cin, planes * 4, stride))
        gated = GatedBottleneck.from_block(dense)
    randomize_bn(gated, gen)
    random_gate(gated, gen)
    return gated.eval()


@pytest.mark.parametrize(("kind", "cin", "planes", "stride"), CASES)
@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_gated_blocks_match_the_dense_masked_computation(kind, cin, planes, stride, size):
    gen = torch.Generator().manual_seed(cin + planes + stride)
    block = make(kind, cin, planes, stride, gen)
    x = torch.randn(3, cin, *size, generator=gen)
    with torch.no_grad():
        out = block(x)
        expected = dense_masked(block, x)
        mask = block.last_mask
        assert 0.05 < mask.mean() < 0.95  # a partial mask: some positions skip the branch
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # Masking the convs' inputs with the dilated mask and the mask changes nothing at the outputs: the
        # dilated mask covers every input position the masked outputs read (a missed one would differ).
        block.mask_conv2_input = True
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert tuple(block.last_dilated.shape[-2:]) == (size if kind == "bottleneck" else tuple(mask.shape[-2:]))


def analytic_macs(block, x: torch.Tensor) -> float:
    """Mean executed MACs per image from the conv shapes: gate everywhere, the shortcut projection at every
    output position, conv1 at the positions its consumers read, the rest at the mask."""
    mask = block.gate.decide(x)
    h, w = x.shape[-2:]
    s = block.stride
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    c = block.conv1.in_channels
    total = c * 9 * ho * wo + c  # the mask unit: 3x3 conv to one channel, linear on the pooled input
    if block.downsample is not None:
        total += block.downsample[0].in_channels * block.downsample[0].out_channels * ho * wo
    m = mask.float().sum((1, 2, 3))
    if isinstance(block, GatedBottleneck):
        width, out = block.conv1.out_channels, block.conv3.out_channels
        d = reads(mask, s, (h, w)).float().sum((1, 2, 3))
        total = total + d * c * width + m * (width * width * 9 + width * out)
    else:
        out = block.conv1.out_channels
        d = reads(mask, 1, (ho, wo)).float().sum((1, 2, 3))
        total = total + d * c * out * 9 + m * out * out * 9
    return float(total.mean())


@pytest.mark.parametrize(("kind", "cin", "planes", "stride"), CASES)
def test_mac_count_is_the_executed_positions(kind, cin, planes, stride):
    gen = torch.Generator().manual_seed(7 + stride)
    block = make(kind, cin, planes, stride, gen)
    x = torch.randn(4, cin, 10, 10, generator=gen)
    counted = count_macs(block, x)
    assert counted == pytest.approx(analytic_macs(block, x), rel=1e-9)
    with torch.no_grad():
        block(x)
    assert 0.0 < float(block.executed_fraction().mean()) < 1.0


def test_a_dense_blocks_state_dict_loads_with_only_the_gate_missing():
    dense = Bottleneck(32, 8, 2, downsample(32, 32, 2))
    gated = GatedBottleneck(Bottleneck(32, 8, 2, downsample(32, 32, 2)))
    missing, unexpected = gated.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("gate.") for k in missing)


@pytest.mark.parametrize(("arch", "blocks", "kind"), [("resnet18", 8, GatedResNetBasicBlock),
                                                      ("resnet50", 16, GatedBottleneck),
                                                      ("resnet101", 33, GatedBottleneck)])
def test_dynconv_gates_every_block_of_the_torchvision_resnets(arch, blocks, kind):
    """Every block, the strided ones too (the official ImageNet code); open gates compute the dense model."""
    cfg = load_config(repo_root() / "params.yaml")
    mcfg = model_cfg({"arch": arch, "width": 1.0, "weights": None})
    torch.manual_seed(0)
    dense = build_model(mcfg, 3, 5).eval()
    method = methods.get("dynconv")
    model, names = method.build(mcfg, method.params(cfg), 3, 5, 0, dense=copy.deepcopy(dense))
    model.eval()
    gated = gated_blocks(model)
    assert len(gated) == len(names) == blocks and all(type(b) is kind for b in gated)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)


def test_a_cifar_dynconv_model_never_loads_torchvision():
    """Importing torchvision costs a process over a second (``torchvision.ops`` imports ``torch._dynamo``): DynConv
    on the CIFAR ResNet, its sparse execution and its compiled plan run in a fresh process without loading it."""
    code = """
import sys, torch
from pipeline import methods
from pipeline.config import load_config
from pipeline.fold import fold_batchnorm
from pipeline.models import build_model, model_cfg
from pipeline.ops.plan import plan_or_reason
from pipeline.ops.sparse_exec import to_sparse_execution
from pipeline.paths import repo_root
cfg = load_config(repo_root() / "params.yaml")
mcfg = model_cfg({"arch": "cifar_resnet", "depth": 8, "width": 0.5, "base_width": 16})
method = methods.get("dynconv")
model, names = method.build(mcfg, method.params(cfg), 3, 5, 0, dense=build_model(mcfg, 3, 5).eval())
planned, why = plan_or_reason(fold_batchnorm(to_sparse_execution(model.eval()))[0])
with torch.no_grad():
    planned(torch.randn(2, 3, 16, 16))
print(len(names), why, "torchvision" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["3", "None", "False"], proc.stdout


# ---------------------------------------------------------------------------
# Sparse (gather / scatter) execution

RTOL = 1e-4


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


def forced(block, mask: torch.Tensor):
    """A copy of the gated block whose mask unit returns ``mask``."""
    copied = copy.deepcopy(block)
    copied.gate.forward = lambda inp: mask
    return copied


@pytest.mark.parametrize(("kind", "cin", "planes", "stride"), CASES)
@pytest.mark.parametrize("engine", ["native", "pytorch"])
def test_sparse_execution_matches_the_gated_block(kind, cin, planes, stride, engine):
    """Own masks and explicit ones (none, some, all positions), at odd sizes, equal the dense-masked block;
    the executed MACs equal the gated block's count. A strided bottleneck's conv1 runs at the expanded mask on
    the input grid (the compiled gate's third position list)."""
    gen = torch.Generator().manual_seed(7 * cin + planes + stride)
    block = make(kind, cin, planes, stride, gen)
    sparse = to_sparse_execution(block)
    sparse.use_native = engine == "native"
    expected_path = engine
    for size in [(8, 8), (9, 7)]:
        x = torch.randn(2, cin, *size, generator=gen)
        with torch.no_grad():
            expected = block(x)
        assert_matches(sparse(x), expected)
        assert sparse.last_path == expected_path
        assert 0.05 < sparse.last_mask.mean() < 0.95
        torch.testing.assert_close(sparse.last_dilated, block.last_dilated, rtol=0, atol=0)
        assert sparse.counted_macs(x) == block.counted_macs(x)
        out_size = sparse._out_size(x)
        for fraction in (0.0, 0.3, 1.0):
            mask = (torch.rand(2, 1, *out_size, generator=gen) < fraction).float()
            with torch.no_grad():
                reference = forced(block, mask)(x)
            assert_matches(sparse.forward_with_mask(x, mask), reference)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_sparse_execution_of_a_gated_torchvision_resnet(arch):
    """Every gated block of a whole network replaced; outputs equal the dense-masked network's."""
    cfg = load_config(repo_root() / "params.yaml")
    mcfg = model_cfg({"arch": arch, "width": 1.0, "weights": None})
    torch.manual_seed(0)
    method = methods.get("dynconv")
    model, _ = method.build(mcfg, method.params(cfg), 3, 5, 0, dense=build_model(mcfg, 3, 5))
    gen = torch.Generator().manual_seed(1)
    for block in gated_blocks(model):
        randomize_bn(block, gen)
        random_gate(block, gen)
    model.eval()
    sparse = to_sparse_execution(model)
    kinds = {type(m).__name__ for m in sparse.modules()}
    assert not any(type(m) in (GatedResNetBasicBlock, GatedBottleneck) for m in sparse.modules())
    assert ("SparseBottleneck" if arch == "resnet50" else "SparseBasicBlock") in kinds
    x = torch.randn(2, 3, 40, 40, generator=gen)
    with torch.no_grad():
        expected = model(x)
        actual = sparse(x)
    assert_matches(actual, expected)
    fractions = [b.last_mask.mean().item() for b in gated_blocks(model)]
    assert 0.05 < sum(fractions) / len(fractions) < 0.95
