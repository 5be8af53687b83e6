"""Compiled CPU kernels (pipeline/ops/native.py): each plan against the PyTorch path of the same module and
against a slow reference, on random inputs; plan caching; the build and its opt-out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.ops import native
from pipeline.ops.dynamic_conv import DynamicConv2d
from pipeline.ops.sd_conv import SDConv2d
from pipeline.ops.sparse_exec import SparseBasicBlock, SparseInvertedResidual
from tests.test_sparse_exec import dense_masked, gated_block, random_mask

# float32; the compiled loops sum in another order than the PyTorch ops (a few hundred terms per output),
# so the absolute tolerance scales with the largest output.
ATOL, RTOL = 1e-5, 1e-4


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=ATOL * scale, rtol=RTOL)


@pytest.fixture(scope="module", autouse=True)
def compiled():
    if not native.enabled():
        pytest.skip("PIPELINE_NATIVE=0")
    module = native.load()
    # The project's machines have a C++ compiler: a failed build must fail here, not fall back silently.
    assert module is not None, "the native kernels did not build (see the RuntimeWarning above)"
    return module


def _dynamic(cls, c_in, c_out, kernel, stride, padding, groups, bias, k, activation, seed=0, **extra):
    torch.manual_seed(seed)
    m = cls(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=bias, num_kernels=k,
            activation=activation, temperature=0.6 if activation == "softmax" else 1.0, **extra)
    nn.init.normal_(m.routing[2].weight, std=1.0)
    nn.init.normal_(m.routing[-1].weight, std=1.0)
    return m.eval()


DYNAMIC = [
    # in, out, kernel, stride, padding, groups, bias, K, activation, map size
    (16, 24, 3, 1, 1, 1, False, 4, "softmax", 8),  # direct 3x3 path (at most 16 x 16)
    (13, 10, 3, 1, 1, 1, True, 3, "sigmoid", 16),  # direct, column remainder (10 = 8 + 2)
    (16, 16, 3, 1, 1, 1, True, 4, "linear", 20),  # above 16 x 16: convolution backend
    (8, 16, 3, 2, 1, 1, True, 4, "softmax", 9),  # strided
    (12, 12, 3, 1, 1, 12, False, 2, "softmax", 7),  # depthwise
    (6, 8, 1, 1, 0, 1, True, 1, "linear", 5),
]


@pytest.mark.parametrize("cfg", DYNAMIC, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cls", [DynamicConv2d, SDConv2d], ids=["dynamic", "sdconv"])
def test_dynamic_plan_matches_pytorch_path_and_reference(cfg, batch, cls):
    *args, size = cfg
    m = _dynamic(cls, *args)
    x = torch.randn(batch, args[0], size, size) + torch.randn(batch, args[0], 1, 1)
    reference = m.forward_reference(x).detach()
    pytorch = copy.deepcopy(m)
    pytorch.use_native = False
    with torch.inference_mode():
        got = m(x)
        assert_close(got, reference)
        assert_close(got, pytorch(x))
        assert_close(m(x.contiguous(memory_format=torch.channels_last)), reference)
    assert "native" in m._inference_cache, "the compiled plan did not run"


def test_dynamic_plan_coefficients_and_aggregation(compiled):
    m = _dynamic(DynamicConv2d, 16, 8, 3, 1, 1, 1, True, 4, "softmax")
    x = torch.randn(5, 16, 6, 6) * 2
    with torch.no_grad():
        plan = m._native_plan()
        a = plan.mixing(x)
        torch.testing.assert_close(a, m.coefficients(x), atol=1e-6, rtol=1e-5)
        for rows in (a[:1].contiguous(), a):  # one sample: the hand loop; several: a GEMM
            expected = rows @ m.weight.reshape(4, -1)
            torch.testing.assert_close(plan.aggregate(rows), expected, atol=1e-6, rtol=1e-5)


def test_dynamic_plan_follows_parameter_changes():
    m = _dynamic(DynamicConv2d, 8, 8, 3, 1, 1, 1, False, 3, "softmax")
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        first = m(x)
        m.weight.mul_(-2.0)  # in place
        second = m(x)
        m.bias = nn.Parameter(torch.randn(3, 8))  # a new parameter object (as BN folding does)
        third = m(x)
        m.set_temperature(5.0)
        fourth = m(x)
    for before, after in ((first, second), (second, third), (third, fourth)):
        assert not torch.allclose(before, after)
    assert_close(fourth, m.forward_reference(x).detach())


def test_sdconv_plan_follows_threshold_changes():
    m = _dynamic(SDConv2d, 8, 8, 3, 1, 1, 1, False, 2, "softmax")
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        before = m(x)
        m.threshold.fill_(float(m.weight.abs().median()))  # prunes about half of the weights
        after = m(x)
    assert not torch.allclose(before, after)
    assert_close(after, m.forward_reference(x).detach())


@pytest.mark.parametrize(("c_in", "c_out", "size", "batch"), [(16, 16, 8, 1), (5, 13, 7, 2), (32, 64, 12, 1),
                                                              (3, 70, 5, 3), (64, 48, 6, 5), (8, 40, 6, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_direct_conv_matches_conv2d(compiled, c_in, c_out, size, batch, channels_last):
    # Batches below the thread count share each sample across threads by output columns (or by rows under 32
    # columns), larger ones run one sample per thread.
    gen = torch.Generator().manual_seed(c_in * 100 + c_out)
    x = torch.randn(batch, c_in, size, size + 1, generator=gen)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen)
    bias = torch.randn(c_out, generator=gen)
    matrix = native.conv3x3_matrix(weight)
    expected = F.conv2d(x, weight, bias, padding=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled.conv3x3_direct(x, matrix, bias), expected, atol=1e-4, rtol=RTOL)
    torch.testing.assert_close(compiled.conv3x3_direct(x, matrix, None), F.conv2d(x, weight, padding=1),
                               atol=1e-4, rtol=RTOL)


@pytest.mark.parametrize("threads", [1, 3])
def test_direct_conv_with_other_thread_counts(compiled, threads):
    # One thread: every batch runs sample by sample; three: batch 2 shares each sample by output columns
    # among three threads, batch 4 runs a sample per thread.
    gen = torch.Generator().manual_seed(threads)
    weight = torch.randn(64, 24, 3, 3, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 2, 4):
            x = torch.randn(batch, 24, 9, 7, generator=gen)
            torch.testing.assert_close(compiled.conv3x3_direct(x, native.conv3x3_matrix(weight), None),
                                       F.conv2d(x, weight, padding=1), atol=1e-4, rtol=RTOL)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["inverted_residual", "inverted_residual_wide", "basic_identity",
                                  "basic_projection_stride2"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dense_above", [2.0, 0.0, None])
def test_block_plans_match_pytorch_path_and_dense_masked(name, fraction, dense_above):
    block, channels, (h, w) = gated_block(name, seed=3)
    cls = SparseInvertedResidual if "inverted" in name else SparseBasicBlock
    compiled_block, pytorch_block = cls.from_gated(block), cls.from_gated(block)
    pytorch_block.use_native = False
    compiled_block.dense_above = pytorch_block.dense_above = dense_above
    x = torch.randn(2, channels, h, w)
    out_h, out_w = compiled_block._out_size(x)
    mask = random_mask(2, out_h, out_w, fraction, seed=4)
    expected = dense_masked(block, x, mask)
    with torch.inference_mode():
        got = compiled_block.forward_with_mask(x, mask)
        assert_close(got, expected)
        assert_close(got, pytorch_block.forward_with_mask(x, mask))
        torch.testing.assert_close(compiled_block.last_mask, mask)
        torch.testing.assert_close(compiled_block.macs_per_image(), pytorch_block.macs_per_image())
        # The mask unit's own decision, computed in the plan, against the gated block's.
        own = compiled_block(x)
        with torch.no_grad():
            reference = block(x)
        torch.testing.assert_close(compiled_block.last_mask, block.last_mask)
        assert_close(own, reference)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_block_plan_is_rebuilt_when_weights_change():
    block, channels, (h, w) = gated_block("basic_identity", seed=5)
    sparse = SparseBasicBlock.from_gated(block)
    x = torch.randn(1, channels, h, w)
    mask = random_mask(1, h, w, 0.5, seed=6)
    with torch.inference_mode():
        before = sparse.forward_with_mask(x, mask)
    with torch.no_grad():
        sparse.w2.mul_(0.5)
    with torch.inference_mode():
        after = sparse.forward_with_mask(x, mask)
    pytorch = copy.deepcopy(sparse)
    pytorch.use_native = False
    assert not torch.allclose(before, after)
    with torch.inference_mode():
        assert_close(after, pytorch.forward_with_mask(x, mask))


def test_opt_out_runs_the_pytorch_paths(monkeypatch):
    monkeypatch.setenv("PIPELINE_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is None and not native.usable(torch.zeros(1))
    m = _dynamic(DynamicConv2d, 8, 8, 3, 1, 1, 1, False, 2, "softmax")
    with torch.inference_mode():
        out = m(torch.randn(1, 8, 5, 5))
    assert "native" not in m._inference_cache and out.shape == (1, 8, 5, 5)


def test_build_name_depends_on_sources(monkeypatch, tmp_path):
    name = native.build_name()
    for source in (*native.SOURCES, *native.HEADERS):
        (tmp_path / source).write_bytes((native.CSRC / source).read_bytes())
    monkeypatch.setattr(native, "CSRC", tmp_path)
    assert native.build_name() == name
    (tmp_path / "row_gemm.h").write_text("// changed\n")
    assert native.build_name() != name
