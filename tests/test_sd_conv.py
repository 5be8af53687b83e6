"""SDConv2d: threshold masks, estimators, regulariser, parameter and MAC counts, pruned export."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pipeline.ops.dynamic_conv import ACTIVATIONS, DynamicConv2d
from pipeline.ops.sd_conv import GRANULARITIES, SDConv2d, Step

torch.set_num_threads(1)

# float32, one conv of at most a few hundred accumulations per output.
ATOL, RTOL = 1e-5, 1e-4

THRESHOLD_SHAPES = {
    "layer": (1, 1, 1, 1, 1),
    "kernel": (3, 1, 1, 1, 1),
    "filter": (3, 8, 1, 1, 1),
    "channel": (3, 8, 6, 1, 1),
}


def make(granularity: str = "filter", estimator: str = "long_tailed", bias: bool = True, seed: int = 0) -> SDConv2d:
    torch.manual_seed(seed)
    m = SDConv2d(6, 8, 3, padding=1, bias=bias, num_kernels=3, activation="softmax",
                 granularity=granularity, estimator=estimator)  # fmt: skip
    nn.init.normal_(m.routing[2].weight, std=1.0)
    nn.init.normal_(m.routing[-1].weight, std=1.0)
    return m


def inputs(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Random images with per-sample channel offsets, so their global averages differ."""
    return torch.randn(b, c, h, w) + 2 * torch.randn(b, c, 1, 1)


def test_zero_threshold_keeps_everything_and_matches_dynamic_conv():
    m = make()
    assert (m.weight != 0).all()
    assert m.keep_ratio() == 1.0 and m.kernel_sparsity() == 0.0
    dense = DynamicConv2d(6, 8, 3, padding=1, bias=True, num_kernels=3, activation="softmax")
    state = {k: v for k, v in m.state_dict().items() if k != "threshold"}
    dense.load_state_dict(state)
    x = inputs(3, 6, 7, 7)
    torch.testing.assert_close(m(x), dense(x), atol=0, rtol=0)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_threshold_prunes_exactly_small_weights(granularity):
    m = make(granularity)
    assert tuple(m.threshold.shape) == THRESHOLD_SHAPES[granularity]
    with torch.no_grad():
        m.threshold.uniform_(0.02, 0.15)
        m.weight[0, 0, 0, 0, 0] = m.threshold.flatten()[0]  # |W| == t exactly: pruned
    expected = (m.weight.abs() > m.threshold.expand_as(m.weight)).float()
    mask = m.mask()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, expected)
    assert mask[0, 0, 0, 0, 0] == 0
    assert 0 < mask.mean() < 1
    assert m.keep_ratio() == pytest.approx(expected.mean().item())
    torch.testing.assert_close(m.kernels(), m.weight * expected, atol=0, rtol=0)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_masked_fast_path_matches_reference(granularity):
    m = make(granularity, seed=1)
    with torch.no_grad():
        m.threshold.fill_(0.08)
    assert 0.2 < m.keep_ratio() < 0.8
    x = inputs(4, 6, 9, 9)
    torch.testing.assert_close(m(x), m.forward_reference(x), atol=ATOL, rtol=RTOL)


def test_inference_reuses_masked_kernels_until_thresholds_change():
    m = make(seed=2).eval()
    with torch.no_grad():
        m.threshold.fill_(0.05)
    x = inputs(1, 6, 9, 9)
    with torch.inference_mode():
        first = m.kernels()
        assert m.kernels() is first  # computed once
        torch.testing.assert_close(m(x), m.forward_reference(x), atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        m.threshold.fill_(0.1)  # in place: the cache must notice
    with torch.inference_mode():
        second = m.kernels()
        assert second is not first and (second != 0).sum() < (first != 0).sum()
        torch.testing.assert_close(m(x), m.forward_reference(x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("estimator", ["ste", "long_tailed"])
def test_gradient_reaches_thresholds_and_weights(estimator):
    m = make("channel", estimator)
    with torch.no_grad():
        m.threshold.fill_(0.05)
    loss = m(inputs(2, 6, 6, 6)).square().sum()
    loss.backward()
    assert m.threshold.grad is not None and m.threshold.grad.abs().sum() > 0
    assert m.weight.grad.abs().sum() > 0


def test_step_estimators_at_known_points():
    x = torch.tensor([0.1, -0.1, 0.5, -0.5, 1.5, -1.5], requires_grad=True)
    y = Step.apply(x, "long_tailed")
    assert y.tolist() == [1, 0, 1, 0, 1, 0]
    y.sum().backward()
    # g(x) = 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 beyond.
    torch.testing.assert_close(x.grad, torch.tensor([1.6, 1.6, 0.4, 0.4, 0.0, 0.0]))
    x.grad = None
    Step.apply(x, "ste").sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(6))
    assert Step.apply(torch.zeros(3), "ste").sum() == 0  # strict: step(0) = 0


def test_long_tailed_threshold_gradient_through_mask():
    m = SDConv2d(1, 1, (1, 3), num_kernels=1, granularity="layer", threshold_init=0.2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.3, -0.7, 1.7]).view(1, 1, 1, 1, 3))  # |W| - t = 0.1, 0.5, 1.5
    m.mask().sum().backward()
    # d/dt step(|W| - t) = -g(|W| - t), summed: -(1.6 + 0.4 + 0).
    assert m.threshold.grad.item() == pytest.approx(-2.0)
    torch.testing.assert_close(m.weight.grad.flatten(), torch.tensor([1.6, -0.4, 0.0]))


def test_regularization_formula():
    m = make("filter")
    with torch.no_grad():
        m.threshold.uniform_(0.0, 1.0)
    expected = sum(torch.exp(-t).item() for t in m.threshold.flatten())
    reg = m.regularization()
    assert reg.dim() == 0
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    reg.backward()
    torch.testing.assert_close(m.threshold.grad, -torch.exp(-m.threshold.detach()))


def test_reset_collapsed():
    m = make("kernel")
    assert m.reset_collapsed() is False
    with torch.no_grad():
        m.threshold.fill_(10.0)
    assert m.keep_ratio() == 0.0
    assert m.reset_collapsed(min_keep=0.01) is True
    assert torch.equal(m.threshold, torch.zeros_like(m.threshold))
    assert m.keep_ratio() == 1.0


def test_parameter_counts_by_hand():
    m = SDConv2d(4, 6, 3, bias=True, num_kernels=2, granularity="kernel")
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.weight[0] = 0.0
        m.weight[1, :3] = 0.0
    kept = 3 * 4 * 9  # kernel 1, filters 3..5
    routing = (4 * 4 + 4) + (4 * 2 + 2)  # hidden = max(4, 4 // 4) = 4
    assert m.nonzero_params() == kept + 2 * 6 + routing + 2
    assert m.dense_params() == 2 * 6 * 4 * 9 + 2 * 6 + routing + 2


# torch warns that it validates sparse tensors on a weights_only load: expected here.
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_export_round_trip_through_weights_only_load(granularity):
    m = make(granularity, seed=2)
    with torch.no_grad():
        m.threshold.fill_(0.1)
    m.set_temperature(0.5)
    record = m.export_pruned()
    buffer = io.BytesIO()
    torch.save(record, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    kernels = loaded["kernels"]
    assert kernels.layout == torch.sparse_coo
    assert kernels._nnz() == int(m.mask().sum().item()) < m.weight.numel()
    dense_sized = [v for v in loaded.values() if isinstance(v, torch.Tensor) and v.numel() >= m.weight.numel()]
    assert dense_sized == [kernels]

    rebuilt = SDConv2d.from_pruned(loaded)
    assert rebuilt.config() == m.config()
    assert torch.equal(rebuilt.mask(), m.mask())
    x = inputs(3, 6, 8, 8)
    torch.testing.assert_close(rebuilt(x), m(x), atol=1e-6, rtol=0)


def test_from_pruned_rejects_foreign_records():
    with pytest.raises(ValueError, match="record"):
        SDConv2d.from_pruned({"weight": torch.zeros(1)})


def test_macs_by_hand():
    m = SDConv2d(2, 2, 3, padding=1, num_kernels=2, granularity="channel")
    with torch.no_grad():
        m.weight.zero_()  # threshold 0 and a strict step: zeros are pruned
        m.weight[0, 0, :, 1, 1] = 1.0  # kernel 0, filter 0: centre of both input channels
        m.weight[1, 0, 0, 1, 1] = 1.0  # kernel 1, filter 0: centre of channel 0 (already kept by kernel 0) ...
        m.weight[1, 0, 1, 0, 0] = 1.0  # ... and a corner of channel 1
        m.weight[0, 1] = 1.0  # kernel 0, filter 1: everything; kernel 1, filter 1: nothing
    macs = m.macs((2, 5, 5))
    union = 3 + 18  # kept positions per filter, union over the two kernels
    assert macs == {
        "conv": 5 * 5 * union,
        "aggregation": 2 + 2 + 18,
        "routing": 2 * 4 + 4 * 2,
        "total": 5 * 5 * union + 22 + 16,
        "conv_dense": 5 * 5 * 2 * 2 * 9,
    }


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_from_conv_reproduces_dense(activation):
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    m = SDConv2d.from_conv(conv, num_kernels=3, activation=activation, noise_std=0.0, granularity="channel")
    assert isinstance(m, SDConv2d) and m.granularity == "channel" and m.keep_ratio() == 1.0
    x = inputs(2, 6, 9, 9)
    torch.testing.assert_close(m(x), conv(x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"granularity": "element"}, "granularity"),
        ({"estimator": "sigmoid"}, "estimator"),
        ({"threshold_init": -0.1}, "threshold_init"),
        ({"activation": "relu"}, "activation"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SDConv2d(4, 4, 3, **kwargs)
