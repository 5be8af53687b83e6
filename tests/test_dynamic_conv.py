"""DynamicConv2d: batched fast path against the per-sample reference, dense equivalence, MACs, arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.ops.dynamic_conv import ACTIVATIONS, DynamicConv2d

torch.set_num_threads(1)

# float32, one conv of at most a few hundred accumulations per output.
ATOL, RTOL = 1e-5, 1e-4

CONFIGS = [
    # in, out, kernel, stride, padding, groups, bias, K, activation
    (6, 8, 3, 1, 0, 1, False, 4, "softmax"),
    (6, 8, 3, 2, 1, 1, True, 3, "sigmoid"),
    (6, 8, 3, 1, 1, 1, True, 1, "linear"),
    (8, 8, 3, 2, 0, 8, False, 4, "linear"),
    (8, 8, 3, 1, 1, 8, True, 3, "softmax"),
    (8, 16, (3, 1), 2, (1, 0), 2, True, 4, "sigmoid"),
    (5, 7, 1, 1, 0, 1, False, 1, "softmax"),
]


def make(cfg: tuple, seed: int = 0) -> DynamicConv2d:
    c_in, c_out, k, s, p, g, bias, n, act = cfg
    torch.manual_seed(seed)
    m = DynamicConv2d(c_in, c_out, k, stride=s, padding=p, groups=g, bias=bias, num_kernels=n, activation=act,
                      temperature=0.7 if act == "softmax" else 1.0)  # fmt: skip
    # Large random routing weights so the coefficients differ across samples.
    nn.init.normal_(m.routing[2].weight, std=1.0)
    nn.init.normal_(m.routing[-1].weight, std=1.0)
    return m


def inputs(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Random images with per-sample channel offsets, so their global averages differ."""
    return torch.randn(b, c, h, w) + 2 * torch.randn(b, c, 1, 1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_fast_path_matches_reference(cfg):
    m = make(cfg)
    x = inputs(5, cfg[0], 11, 9)
    fast, ref = m(x), m.forward_reference(x)
    assert fast.shape == ref.shape == (5, cfg[1], *m.output_hw(11, 9))
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref, atol=ATOL, rtol=RTOL)
    if m.num_kernels > 1 or m.activation != "softmax":
        a = m.coefficients(x)
        assert not torch.allclose(a[0], a[1]), "coefficients must differ across samples for the test to mean anything"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("batch", [1, 4])
def test_inference_path_matches_reference(cfg, batch):
    m = make(cfg).eval()
    x = inputs(batch, cfg[0], 11, 9)
    ref = m.forward_reference(x).detach()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(m(x), ref, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref, atol=ATOL, rtol=RTOL)


def test_inference_cache_follows_weight_updates():
    m = make(CONFIGS[1]).eval()
    x = inputs(2, 6, 8, 8)
    with torch.inference_mode():
        before = m(x)
    with torch.no_grad():
        m.routing[2].weight.mul_(-1.5)  # in place: the cached transposed copy must be rebuilt
    with torch.inference_mode():
        after = m(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, m.forward_reference(x).detach(), atol=ATOL, rtol=RTOL)
    clone = copy.deepcopy(m)
    torch.testing.assert_close(clone(x), m(x), atol=0, rtol=0)


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4], CONFIGS[5]], ids=lambda c: "-".join(map(str, c)))
def test_fast_path_gradients_match_reference(cfg):
    m = make(cfg)
    x = inputs(4, cfg[0], 8, 8)
    target = torch.randn(4, cfg[1], *m.output_hw(8, 8))
    grads = []
    for fn in (m.forward, m.forward_reference):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        ((fn(xi) - target) ** 2).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    names = ["input"] + [n for n, _ in m.named_parameters()]
    assert {"weight", "routing.2.weight", "routing.4.weight"} <= set(names)
    for name, g_fast, g_ref in zip(names, *grads):
        assert g_fast.abs().sum() > 0, name
        # Gradients sum over the batch and a squared loss: a looser absolute tolerance.
        torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4, msg=name)


def test_single_linear_kernel_is_plain_conv():
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    m = DynamicConv2d(6, 8, 3, stride=2, padding=1, bias=True, num_kernels=1, activation="linear")
    with torch.no_grad():
        m.weight.copy_(conv.weight.unsqueeze(0))
        m.bias.copy_(conv.bias.unsqueeze(0))
        m.routing[-1].weight.zero_()
        m.routing[-1].bias.fill_(1.0)
    x = torch.randn(3, 6, 10, 10)
    torch.testing.assert_close(m(x), conv(x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("groups,bias", [(1, True), (4, False)])
def test_from_conv_reproduces_dense(activation, groups, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=groups, bias=bias)
    m = DynamicConv2d.from_conv(conv, num_kernels=3, activation=activation, noise_std=0.0)
    assert (m.stride, m.padding, m.groups, m.bias is not None) == ((2, 2), (1, 1), groups, bias)
    x = torch.randn(4, 8, 9, 9) * 3
    torch.testing.assert_close(m(x), conv(x), atol=ATOL, rtol=RTOL)


def test_from_conv_noise_makes_kernels_differ_and_is_seeded():
    conv = nn.Conv2d(4, 4, 3)
    a = DynamicConv2d.from_conv(conv, noise_std=0.05, generator=torch.Generator().manual_seed(0))
    b = DynamicConv2d.from_conv(conv, noise_std=0.05, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a.weight[0], a.weight[1])
    assert torch.equal(a.weight, b.weight)
    # Noise is relative to the dense weight's spread: well below it.
    assert (a.weight - conv.weight).std() < 0.2 * conv.weight.std()


def test_macs_hand_computed():
    m = DynamicConv2d(64, 64, 3, padding=1, num_kernels=4)
    macs = m.macs((64, 32, 32))
    assert macs == {
        "conv": 32 * 32 * 64 * 64 * 9,  # 37,748,736
        "aggregation": 4 * 36_864,
        "routing": 64 * 16 + 16 * 4,
        "total": 37_748_736 + 147_456 + 1_088,
    }


@pytest.mark.parametrize("cfg", [(64, 64, 3, 1, 1, 1, False, 4, "softmax"), (16, 32, 3, 2, 0, 4, True, 3, "sigmoid")])
def test_macs_agree_with_flop_counter(cfg):
    m = make(cfg)
    m.use_native = False  # the counter sees ATen operators only, not the compiled kernels
    x = torch.randn(1, cfg[0], 32, 32)
    with FlopCounterMode(display=False) as counter:
        m(x)
    counted = counter.get_total_flops() // 2
    # Within 1 %: the counter sees the conv, the aggregation matmuls and the routing linears.
    assert abs(m.macs((cfg[0], 32, 32))["total"] - counted) <= 0.01 * counted


def test_output_hw_matches_conv():
    m = DynamicConv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    y = m(torch.randn(2, 3, 13, 10))
    assert tuple(y.shape[2:]) == m.output_hw(13, 10)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_coefficients_follow_routing_module(activation):
    m = make((6, 8, 3, 1, 0, 1, False, 4, activation))
    x = inputs(3, 6, 7, 5)
    z = m.routing(x)
    expected = {"linear": z, "sigmoid": torch.sigmoid(z), "softmax": F.softmax(z / 0.7, dim=1)}[activation]
    torch.testing.assert_close(m.coefficients(x), expected)
    if activation == "softmax":
        torch.testing.assert_close(m.coefficients(x).sum(1), torch.ones(3))


def test_temperature_only_affects_softmax():
    m = make((6, 8, 3, 1, 0, 1, False, 4, "softmax"))
    x = torch.randn(2, 6, 7, 7)
    z = m.routing(x)
    m.set_temperature(2.5)
    assert m.temperature == 2.5
    torch.testing.assert_close(m.coefficients(x), F.softmax(z / 2.5, dim=1))
    s = make((6, 8, 3, 1, 0, 1, False, 4, "sigmoid"))
    before = s.coefficients(x)
    s.set_temperature(3.0)
    torch.testing.assert_close(s.coefficients(x), before)


def test_repr_names_the_mixture():
    text = repr(DynamicConv2d(4, 4, 3, num_kernels=3, activation="sigmoid", temperature=2.0))
    assert "num_kernels=3" in text and "activation=sigmoid" in text and "temperature=2" in text


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"activation": "relu"}, "activation"),
        ({"num_kernels": 0}, "num_kernels"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"groups": 3}, "groups"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"stride": (1, 0)}, "stride"),
        ({"padding": -1}, "padding"),
        ({"reduction": 0}, "reduction"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        DynamicConv2d(**args)


def test_bad_temperature_update_and_input_raise():
    m = DynamicConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="temperature"):
        m.set_temperature(0)
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="conv"):
        DynamicConv2d.from_conv(nn.Conv2d(4, 4, 3, padding_mode="reflect"))
