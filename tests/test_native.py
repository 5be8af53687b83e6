"""Compiled CPU kernels (pipeline/ops/native.py): each plan against the PyTorch path of the same module and
against a slow reference, on random inputs; plan caching; the build and its opt-out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.ops import native
from pipeline.ops.dynamic_conv import DynamicConv2d, direct_conv3x3
from pipeline.ops.sd_conv import SDConv2d
from pipeline.ops.sparse_exec import SparseBasicBlock, SparseInvertedResidual
from tests.test_sparse_exec import gated_block

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
    (16, 24, 3, 1, 1, 1, False, 4, "softmax", 8),  # direct 3x3 path
    (13, 10, 3, 1, 1, 1, True, 3, "sigmoid", 16),  # direct, column remainder (10 = 8 + 2)
    (16, 48, 3, 1, 1, 1, True, 4, "linear", 20),  # direct, 32 + 16 columns
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
        m.weight.data = m.weight.data * 0.5  # new storage under the same parameter object
        fifth = m(x)
    for before, after in ((first, second), (second, third), (third, fourth), (fourth, fifth)):
        assert not torch.allclose(before, after)
    assert_close(fifth, m.forward_reference(x).detach())


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


TRAIN = [
    # in, out, batch, height, width, bias, K, channels_last
    (64, 64, 4, 16, 16, False, 4, False),
    (5, 13, 3, 7, 6, True, 2, False),  # channels and columns that are not multiples of 8
    (24, 40, 2, 5, 9, True, 3, True),
    (16, 70, 5, 6, 6, True, 1, True),
]


def _train_pair(cls, cfg):
    c_in, c_out, batch, h, w, bias, k, channels_last = cfg
    fast = _dynamic(cls, c_in, c_out, 3, 1, 1, 1, bias, k, "softmax").train()
    slow = copy.deepcopy(fast)
    slow.use_native = False
    x = torch.randn(batch, c_in, h, w) + torch.randn(batch, c_in, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return fast, slow, x


def _grads(module, x, gy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad, {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cfg", TRAIN, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("cls", [DynamicConv2d, SDConv2d])
def test_training_op_matches_grouped_conv_path(cfg, cls):
    # The compiled training op (forward and every gradient) against the grouped-conv PyTorch path.
    fast, slow, x = _train_pair(cls, cfg)
    assert x.shape[0] >= torch.get_num_threads()
    gy = torch.randn(x.shape[0], cfg[1], *x.shape[2:])
    assert type(fast(x).grad_fn).__name__ == "_DirectDynamicConv3x3Backward"
    fast.zero_grad()
    y, gx, grads = _grads(fast, x, gy)
    y_ref, gx_ref, grads_ref = _grads(slow, x, gy)
    assert_close(y, y_ref)
    assert_close(gx, gx_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_close(grads[name], grads_ref[name])


def test_training_op_matches_per_sample_reference():
    fast, _, x = _train_pair(DynamicConv2d, TRAIN[1])
    gy = torch.randn(x.shape[0], TRAIN[1][1], *x.shape[2:])
    y, gx, grads = _grads(fast, x, gy)
    x_ref = x.detach().clone().requires_grad_()
    fast.zero_grad()
    fast.forward_reference(x_ref).backward(gy)
    assert_close(gx, x_ref.grad)
    assert_close(grads["weight"], fast.weight.grad)
    assert_close(grads["routing.2.weight"], fast.routing[2].weight.grad)


def test_training_op_computes_only_the_gradients_asked_for():
    fast, slow, x = _train_pair(DynamicConv2d, TRAIN[1])
    for m in (fast, slow):
        m.weight.requires_grad_(False)
    gy = torch.randn(x.shape[0], TRAIN[1][1], *x.shape[2:])
    y = fast(x)  # x without grad
    y.backward(gy)
    slow(x).backward(gy)
    assert fast.weight.grad is None
    assert_close(fast.bias.grad, slow.bias.grad)
    assert_close(fast.routing[2].weight.grad, slow.routing[2].weight.grad)


def test_training_op_not_used_where_it_does_not_apply():
    # Batches below the thread count and other conv geometries train through the grouped conv.
    m = _dynamic(DynamicConv2d, 8, 8, 3, 2, 1, 1, False, 2, "softmax").train()
    y = m(torch.randn(4, 8, 6, 6))
    assert type(y.grad_fn).__name__ != "_DirectDynamicConv3x3Backward"
    m = _dynamic(DynamicConv2d, 8, 8, 3, 1, 1, 1, False, 2, "softmax").train()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = m(torch.randn(1, 8, 6, 6))
    finally:
        torch.set_num_threads(before)
    assert type(y.grad_fn).__name__ != "_DirectDynamicConv3x3Backward"


def test_static_direct_conv_trains_like_conv2d():
    # The training benchmark's static baseline on the compiled kernels.
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(20, 12, 3, 3, generator=gen, requires_grad=True)
    x = torch.randn(4, 12, 7, 9, generator=gen, requires_grad=True)
    gy = torch.randn(4, 20, 7, 9, generator=gen)
    direct_conv3x3(x, weight).backward(gy)
    gx, gw = x.grad, weight.grad
    x.grad = weight.grad = None
    F.conv2d(x, weight, padding=1).backward(gy)
    assert_close(gx, x.grad)
    assert_close(gw, weight.grad)


@pytest.mark.parametrize("threads", [1, 3])
def test_training_op_with_other_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast, slow, x = _train_pair(DynamicConv2d, (16, 24, 4, 6, 6, True, 4, False))
        gy = torch.randn(4, 24, 6, 6)
        assert type(fast(x).grad_fn).__name__ == "_DirectDynamicConv3x3Backward"
        y, gx, grads = _grads(fast, x, gy)
        y_ref, gx_ref, grads_ref = _grads(slow, x, gy)
    finally:
        torch.set_num_threads(before)
    assert_close(gx, gx_ref)
    for name in grads:
        assert_close(grads[name], grads_ref[name])


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
@pytest.mark.parametrize("open_bias", [-3.0, 3.0])
def test_one_block_plans_with_closed_and_open_masks_match_the_dense_masked_block(name, open_bias):
    """Partial masks: tests/test_sparse_exec.py (both engines, 1 and 2 threads)."""
    block, channels, (h, w) = gated_block(name, seed=3)
    with torch.no_grad():
        block.gate.init_open(open_bias)
    cls = SparseInvertedResidual if "inverted" in name else SparseBasicBlock
    sparse = cls.from_gated(block)
    x = torch.randn(2, channels, h, w)
    with torch.inference_mode():
        got = sparse(x)
    assert sparse.last_path == "native"
    with torch.no_grad():
        expected = block(x)
    assert_close(got, expected)
    torch.testing.assert_close(sparse.last_mask, block.last_mask, rtol=0, atol=0)
    torch.testing.assert_close(sparse.last_dilated, block.last_dilated, rtol=0, atol=0)
    torch.testing.assert_close(sparse.macs_per_image(), block.macs_per_image(), rtol=0, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_one_block_plan_is_rebuilt_when_weights_change():
    block, channels, (h, w) = gated_block("basic_identity", seed=5)
    with torch.no_grad():
        block.gate.conv.bias.zero_()
    sparse = SparseBasicBlock.from_gated(block)
    x = torch.randn(1, channels, h, w)
    with torch.inference_mode():
        before = sparse(x)
    with torch.no_grad():
        sparse.w2.mul_(0.5)
    with torch.inference_mode():
        after = sparse(x)
    assert sparse.last_path == "native" and 0 < sparse.last_mask.mean() < 1
    pytorch = copy.deepcopy(sparse)
    pytorch.use_native = False
    assert not torch.allclose(before, after)
    with torch.inference_mode():
        assert_close(after, pytorch(x))


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
