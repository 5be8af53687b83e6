"""Sparse (gather / scatter) execution of DynConv gated blocks: equality with the
dense-masked gated blocks for explicit and self-made masks, both engines (the
compiled one-block plan and the PyTorch reference), whole converted networks, and
input checks."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn

from pipeline import methods
from pipeline.models.cifar_mobilenetv2 import CifarMobileNetV2, InvertedResidual
from pipeline.models.cifar_resnet import BasicBlock, CifarResNet
from pipeline.ops.sparse_exec import SparseBasicBlock, SparseInvertedResidual, to_sparse_execution
from pipeline.ops.spatial_gate import GatedBasicBlock, GatedInvertedResidual, gated_blocks

from .conftest import method_params

RTOL = 1e-4

# name -> (gated block factory, input channels, input size)
BLOCKS = {
    "inverted_residual": (lambda: GatedInvertedResidual(8, 8, 1, 6), 8, (9, 7)),
    "inverted_residual_wide": (lambda: GatedInvertedResidual(16, 16, 1, 3), 16, (12, 12)),
    "basic_identity": (lambda: GatedBasicBlock(8, 8, 1), 8, (9, 10)),
    "basic_projection_stride2": (lambda: GatedBasicBlock(6, 12, 2), 6, (11, 8)),
}
ENGINES = {"native": True, "pytorch": False}  # use_native


@pytest.fixture
def num_threads():
    """Set torch's intra-op threads for the test; restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights and non-trivial BN affine parameters and running statistics; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / (m.weight[0].numel() ** 0.5))
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_mean.copy_(0.6 * torch.rand(n, generator=gen) - 0.3)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
    return module.eval()


def gated_block(name: str, seed: int = 0) -> tuple[nn.Module, int, tuple[int, int]]:
    factory, channels, size = BLOCKS[name]
    torch.manual_seed(seed)
    return randomize(factory(), seed), channels, size


def random_mask(batch: int, height: int, width: int, fraction: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    active = round(fraction * height * width)
    order = torch.rand(batch, height * width, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, height * width)
    mask.scatter_(1, order[:, :active], 1.0)
    return mask.view(batch, 1, height, width)


def dense_masked(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The gated block's own (dense-masked) forward with its mask unit forced to ``mask``."""
    forced = copy.deepcopy(block)
    forced.gate.forward = lambda inp: mask
    with torch.no_grad():
        return forced(x)


def sparse_copy(block: nn.Module, engine: str) -> nn.Module:
    sparse = to_sparse_execution(block)
    sparse.use_native = ENGINES[engine]
    return sparse


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


# ---------------------------------------------------------------------------
# Equality with the dense-masked computation


@pytest.mark.parametrize("name", list(BLOCKS))
def test_explicit_masks_match_dense_masked_block(name):
    block, channels, (h, w) = gated_block(name)
    sparse = to_sparse_execution(block)
    for batch, fraction in itertools.product((1, 3), (0.0, 0.1, 0.5, 1.0)):
        seed = int(fraction * 100) + batch
        x = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))
        out_h, out_w = sparse._out_size(x)
        mask = random_mask(batch, out_h, out_w, fraction, seed)
        expected = dense_masked(block, x, mask)
        actual = sparse.forward_with_mask(x, mask)
        assert actual.shape == expected.shape
        assert_matches(actual, expected)
        torch.testing.assert_close(sparse.last_mask, mask, rtol=0, atol=0)
        dilated = torch.nn.functional.max_pool2d(mask, 3, 1, 1)
        torch.testing.assert_close(sparse.last_dilated, dilated, rtol=0, atol=0)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_last_path_names_the_engine(engine):
    block, channels, (h, w) = gated_block("inverted_residual")
    sparse = sparse_copy(block, engine)
    assert sparse.last_path is None and sparse.last_mask is None
    sparse(torch.randn(2, channels, h, w))
    assert sparse.last_path == engine
    sparse.forward_with_mask(torch.randn(2, channels, h, w), random_mask(2, h, w, 0.3, 0))
    assert sparse.last_path == "pytorch"  # an explicit mask runs in PyTorch


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_no_active_position_gives_the_shortcut(name, engine):
    block, channels, (h, w) = gated_block(name)
    with torch.no_grad():
        block.gate.init_open(-3.0)  # every logit negative
    sparse = sparse_copy(block, engine)
    x = torch.randn(2, channels, h, w)
    with torch.no_grad():
        expected = torch.relu(block.shortcut(x)) if isinstance(block, GatedBasicBlock) else x
    for out in (sparse(x), sparse.forward_with_mask(x, torch.zeros(2, 1, *sparse._out_size(x)))):
        assert_matches(out, expected)
        assert out.data_ptr() != x.data_ptr()
        assert sparse.last_mask.sum() == 0 and sparse.last_dilated.sum() == 0


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("threads", [1, 2])
def test_own_gate_masks_match_gated_block(name, engine, threads, num_threads):
    block, channels, (h, w) = gated_block(name, seed=1)
    with torch.no_grad():  # about half of the positions fire
        block.gate.conv.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(5))
        block.gate.conv.bias.zero_()
        block.gate.fc.bias.zero_()
    sparse = sparse_copy(block, engine)
    num_threads(threads)
    for batch in (1, 3):
        x = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(6 + batch))
        with torch.no_grad():
            expected = block(x)
            logits = block.gate.last_logits
        # The compiled mask unit sums in another order: keep clear of logits that round either way.
        assert logits.abs().min() > 1e-4
        assert 0.2 < block.last_mask.mean() < 0.8
        out = sparse(x)
        assert sparse.last_path == engine
        assert_matches(out, expected)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(sparse.last_mask, block.last_mask, rtol=0, atol=0)
        torch.testing.assert_close(sparse.last_dilated, block.last_dilated, rtol=0, atol=0)
        torch.testing.assert_close(sparse.macs_per_image(), block.macs_per_image(), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_compiled_mask_unit_equals_the_modules_and_follows_parameter_changes(name):
    block, channels, (h, w) = gated_block(name, seed=2)
    sparse = to_sparse_execution(block)
    x = torch.randn(2, channels, h, w)
    for step in range(2):
        with torch.no_grad():
            sparse.gate.conv.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(10 + step))
            sparse.gate.fc.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(20 + step))
            expected = sparse.gate(x)
        logits = sparse.gate.last_logits
        assert logits.abs().min() > 1e-4
        sparse(x)
        assert sparse.last_path == "native"
        torch.testing.assert_close(sparse.last_mask, expected, rtol=0, atol=0)


def test_channels_last_and_nchw_inputs_agree_and_output_is_channels_last():
    block, channels, (h, w) = gated_block("inverted_residual")
    sparse = to_sparse_execution(block)
    x = torch.randn(2, channels, h, w)
    mask = random_mask(2, h, w, 0.3, 0)
    a = sparse.forward_with_mask(x, mask)
    b = sparse.forward_with_mask(x.contiguous(memory_format=torch.channels_last), mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, x.contiguous())  # input untouched


def test_tables_and_plans_follow_batch_and_map_size():
    block, channels, _ = gated_block("basic_identity")
    with torch.no_grad():
        block.gate.conv.bias.zero_()
    sparse = to_sparse_execution(block)
    for batch, (h, w) in [(1, (6, 6)), (4, (6, 6)), (2, (5, 9)), (1, (6, 6))]:
        x = torch.randn(batch, channels, h, w)
        mask = random_mask(batch, h, w, 0.3, batch)
        assert_matches(sparse.forward_with_mask(x, mask), dense_masked(block, x, mask))
        with torch.no_grad():
            assert_matches(sparse(x), block(x))


def test_bool_mask_and_inference_mode():
    block, channels, (h, w) = gated_block("basic_projection_stride2")
    sparse = to_sparse_execution(block)
    x = torch.randn(2, channels, h, w)
    mask = random_mask(2, *sparse._out_size(x), 0.4, 3)
    expected = dense_masked(block, x, mask)
    with torch.inference_mode():
        out = sparse.forward_with_mask(x, mask.bool())
    assert_matches(out, expected)
    # Tables built under inference_mode are ordinary tensors: a later no-grad forward works.
    assert_matches(sparse.forward_with_mask(x, mask), expected)


# ---------------------------------------------------------------------------
# Whole networks


def gated_network(model: nn.Module, seed: int) -> nn.Module:
    methods.get("dynconv").convert(model, method_params("dynconv"), seed)
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # mask units that fire on part of the map
        for block in gated_blocks(model):
            block.gate.conv.weight.normal_(0.0, 1.0, generator=gen)
            block.gate.conv.bias.fill_(0.2)
            block.gate.fc.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet", "mobilenetv2"])
def test_to_sparse_execution_matches_gated_network(arch):
    torch.manual_seed(0)
    if arch == "resnet":
        model = gated_network(CifarResNet(depth=14, width=0.5, in_channels=3, num_classes=10), 0)
    else:
        model = gated_network(CifarMobileNetV2(width=0.25, in_channels=3, num_classes=10, last_channels=64), 1)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    fractions = [b.last_mask.mean().item() for b in gated_blocks(model)]
    assert any(0.05 < f < 0.95 for f in fractions), fractions  # some blocks really skip positions

    sparse = to_sparse_execution(model)
    gated_names = [n for n, m in model.named_modules() if isinstance(m, (GatedBasicBlock, GatedInvertedResidual))]
    sparse_names = [n for n, m in sparse.named_modules() if isinstance(m, (SparseBasicBlock, SparseInvertedResidual))]
    assert sparse_names == gated_names and gated_names
    assert not any(isinstance(m, (GatedBasicBlock, GatedInvertedResidual)) for m in sparse.modules())
    assert not sparse.training
    for engine in ENGINES.values():
        for block in sparse.modules():
            if isinstance(block, (SparseBasicBlock, SparseInvertedResidual)):
                block.use_native = engine
        with torch.no_grad():
            actual = sparse(x)
        assert_matches(actual, expected)
    # the original model is untouched
    assert isinstance(model.get_submodule(gated_names[0]), (GatedBasicBlock, GatedInvertedResidual))


def test_sparse_network_pickles_and_deep_copies_after_a_forward():
    model = gated_network(CifarResNet(depth=8, width=0.5, in_channels=1, num_classes=3), 4)
    sparse = to_sparse_execution(model)
    x = torch.randn(2, 1, 8, 8)
    expected = sparse(x)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_state_dict_holds_folded_weights_and_mask_unit():
    block, channels, (h, w) = gated_block("basic_projection_stride2")
    sparse = to_sparse_execution(block)
    keys = set(sparse.state_dict())
    assert {"w1", "b1", "w2", "b2", "ws", "bs", "gate.conv.weight", "gate.fc.weight"} <= keys
    fresh = to_sparse_execution(gated_block("basic_projection_stride2", seed=9)[0])
    fresh.load_state_dict(sparse.state_dict())
    x = torch.randn(2, channels, h, w)
    mask = random_mask(2, *sparse._out_size(x), 0.3, 1)
    torch.testing.assert_close(fresh.forward_with_mask(x, mask), sparse.forward_with_mask(x, mask))


# ---------------------------------------------------------------------------
# Misuse


def test_training_mode_raises():
    block, channels, (h, w) = gated_block("inverted_residual")
    sparse = to_sparse_execution(block).train()
    x = torch.randn(1, channels, h, w)
    with pytest.raises(RuntimeError, match="inference only"):
        sparse(x)
    with pytest.raises(RuntimeError, match="inference only"):
        sparse.forward_with_mask(x, torch.ones(1, 1, h, w))


def test_conversion_needs_eval_mode_and_gated_blocks():
    block, _, _ = gated_block("basic_identity")
    with pytest.raises(ValueError, match="eval"):
        SparseBasicBlock.from_gated(copy.deepcopy(block).train())
    with pytest.raises(ValueError, match="eval"):
        to_sparse_execution(copy.deepcopy(block).train())
    with pytest.raises(ValueError, match="GatedInvertedResidual"):
        SparseInvertedResidual.from_gated(block)
    with pytest.raises(ValueError, match="GatedBasicBlock"):
        SparseBasicBlock.from_gated(BasicBlock(4, 4).eval())
    with pytest.raises(ValueError, match="nn.Module"):
        to_sparse_execution("model")
    plain = nn.Sequential(InvertedResidual(4, 4, 1, 2)).eval()  # nothing gated: an equal copy
    assert isinstance(to_sparse_execution(plain)[0], InvertedResidual)


@pytest.mark.parametrize("bad", [
    lambda s: s(torch.randn(1, 5, 6, 6)),  # wrong channel count
    lambda s: s(torch.randn(8, 6, 6)),  # not 4-D
    lambda s: s(torch.randn(1, 8, 0, 6)),  # empty
    lambda s: s(torch.ones(1, 8, 6, 6, dtype=torch.long)),  # not floating point
    lambda s: s.forward_with_mask(torch.randn(1, 8, 6, 6), torch.ones(1, 1, 5, 6)),  # mask shape
    lambda s: s.forward_with_mask(torch.randn(2, 8, 6, 6), torch.ones(1, 1, 6, 6)),  # mask batch
    lambda s: s.forward_with_mask(torch.randn(1, 8, 6, 6), [[1.0]]),  # mask not a tensor
])
def test_bad_input_raises_value_error(bad):
    sparse = to_sparse_execution(gated_block("basic_identity")[0])
    with pytest.raises(ValueError):
        bad(sparse)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(BLOCKS))
def test_cuda_matches_cpu(name):
    block, channels, (h, w) = gated_block(name)
    sparse = to_sparse_execution(block)
    x = torch.randn(3, channels, h, w)
    mask = random_mask(3, *sparse._out_size(x), 0.3, 0)
    expected = sparse.forward_with_mask(x, mask)
    actual = sparse.cuda().forward_with_mask(x.cuda(), mask.cuda())
    assert_matches(actual.cpu(), expected)


def test_block_benchmark_row_is_a_checked_dict():
    from benchmarks.bench_sparse_block import coherent_mask, format_row, measure_row

    mask = coherent_mask(2, 8, 8, 0.25, seed=0)
    assert mask.sum().item() == 2 * 16
    row = measure_row("ir", 8, 8, 1, 0.25, reps=1, warmup=0)  # also checks sparse == dense-masked
    assert row["dense_ms"] > 0 and row["sparse_ms"] > 0 and row["ideal"] == 4.0
    assert row["target"] == 2.0 and isinstance(row["passed"], bool)
    assert row["sparse_path"] == "native"
    assert "mbv2-ir" in format_row(row)
