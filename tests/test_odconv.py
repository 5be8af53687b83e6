"""ODConv: the operator against the per-sample loop of Eq. 3 and against DynamicConv2d, conversion,
MACs, BN folding, and the method through the registry."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import methods
from pipeline.complexity import count_macs
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.ops.dynamic_conv import DynamicConv2d
from pipeline.ops.odconv import ATTENTIONS, ODConv2d

from .conftest import build_method, config, fold_into, method_params, model_cfg, random_batchnorm, round_trip

RTOL = 1e-5


def random_odconv(seed: int = 0, **kwargs) -> ODConv2d:
    """An ODConv whose four attentions vary across samples, channels and positions."""
    torch.manual_seed(seed)
    m = ODConv2d(**{"in_channels": 8, "out_channels": 12, "kernel_size": 3, "padding": 1, **kwargs})
    with torch.no_grad():
        for head in m.heads.values():
            head.weight.normal_(0.0, 0.5)
            head.bias.normal_(0.0, 0.5)
        m.bn.running_mean.uniform_(-0.1, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * b.abs().max().item())


@pytest.mark.parametrize("kwargs", [
    {},
    {"stride": 2},
    {"num_kernels": 1},
    {"kernel_size": 1, "padding": 0},
    {"attentions": ["kernel", "channel"]},
    {"attentions": ["kernel", "spatial", "filter"], "num_kernels": 2, "temperature": 3.0},
])
def test_forward_equals_the_per_sample_loop_of_eq3(kwargs):
    m = random_odconv(**kwargs)
    x = torch.randn(5, 8, 9, 7)
    with torch.no_grad():
        close(m(x), m.forward_reference(x))
    one = x[:1]
    with torch.no_grad():  # batch 1 runs the plain conv
        close(m(one), m.forward_reference(one))


def test_training_forward_and_gradients_match_the_loop():
    m = random_odconv(num_kernels=3).train()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    m.bn.eval()  # same batch statistics in both passes
    y, y_ref = m(x), m.forward_reference(x)
    close(y, y_ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, m.weight, *m.heads.parameters()])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, m.weight, *m.heads.parameters()])
    for a, b in zip(grads, grads_ref):
        close(a, b)
    assert all(a.abs().sum() > 0 for a in grads)  # every head receives gradient


def test_with_only_the_kernel_attention_it_is_dynamic_conv():
    """a_s = a_c = a_f = 1: y = (sum_i a_wi W_i) * x, the DY-Conv / DynamicConv2d function."""
    od = random_odconv(num_kernels=4, attentions=["kernel"])
    assert od.attentions == ("kernel",)
    dyn = DynamicConv2d(8, 12, 3, padding=1, num_kernels=4)
    with torch.no_grad():
        dyn.weight.copy_(od.weight)
    x = torch.randn(6, 8, 10, 10)
    a = torch.softmax(torch.randn(6, 4), dim=1)
    dyn.coefficients = lambda _x: a  # the same coefficients for both
    close(od.forward_with(x, {"kernel": a}), dyn(x).detach())
    # and the full operator with its spatial, channel and filter attentions at exactly 1
    full = random_odconv(num_kernels=4)
    with torch.no_grad():
        full.weight.copy_(od.weight)
    ones = {"kernel": a, "spatial": torch.ones(6, 9), "channel": torch.ones(6, 8), "filter": torch.ones(6, 12)}
    close(full.forward_with(x, ones), dyn(x).detach())


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="kernel attention"):
        ODConv2d(8, 8, 3, num_kernels=4, attentions=["spatial"])
    with pytest.raises(ValueError, match="attentions must be among"):
        ODConv2d(8, 8, 3, attentions=["temporal"])
    with pytest.raises(ConfigError, match="'convert.odconv': attentions: the kernel attention"):
        methods.validate(config({"convert": {"odconv": {"attentions": ["spatial", "channel"]}}}))


def test_special_cases_of_the_official_code():
    assert ODConv2d(8, 8, 1).attentions == ("channel", "filter", "kernel")  # 1x1: no spatial attention
    assert ODConv2d(8, 8, 3, groups=8).attentions == ("spatial", "channel", "kernel")  # depthwise: no filter
    assert ODConv2d(8, 8, 3, num_kernels=1).attentions == ("spatial", "channel", "filter")
    assert ODConv2d(64, 8, 3).hidden == 16 and ODConv2d(512, 8, 3).hidden == 32  # max(C/16, 16)


@pytest.mark.parametrize("attentions", [list(ATTENTIONS), ["kernel"], ["kernel", "filter"]])
@pytest.mark.parametrize("n", [1, 4])
def test_from_conv_computes_the_dense_function(attentions, n):
    if n > 1 and "kernel" not in attentions:
        pytest.skip("invalid")
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    od = ODConv2d.from_conv(conv, noise_std=0.0, num_kernels=n, attentions=attentions, temperature=30.0).eval()
    x = torch.randn(3, 8, 7, 7)
    assert od.start_scale == 0.5 ** len(set(od.attentions) - {"kernel"})
    with torch.no_grad():
        close(od(x), conv(x) * od.start_scale)
        bn = torch.nn.BatchNorm2d(16).eval()
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        ref = bn(conv(x))
        od.rescale_following_bn(bn)
        close(bn(od(x)), ref)


def test_mac_count_is_the_flop_counter_plus_the_elementwise_scalings():
    m = random_odconv(num_kernels=4, stride=2)
    x = torch.randn(3, 8, 16, 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(x)
    matmul_and_conv = counter.get_total_flops() / 2 / len(x)  # conv, kernel mixing matmul, attention linears
    macs = m.macs((8, 16, 16))
    elementwise = macs["scaling"] + m.weight[0].numel()  # a_c * x, a_f * y, a_s * kernel
    assert macs["total"] == pytest.approx(matmul_and_conv + elementwise, rel=1e-9)
    assert m.counted_macs(x) == macs["total"] * 3


def test_batchnorm_folds_into_the_kernels_and_a_bias():
    m, bn = random_odconv(), random_batchnorm(12)
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        ref = bn(m(x))
        fold_into(m, bn)
        close(m(x), ref)


# ------------------------------------------------------------------------- the method
RESNET = model_cfg(arch="cifar_resnet", depth=8)


def test_converted_model_starts_as_the_dense_model_and_counts_its_attention_cost():
    torch.manual_seed(0)
    dense = build_model(RESNET, 1, 10).eval()
    model, names = build_method("odconv", RESNET, {"width": 1.0, "noise_std": 0.0}, dense)
    assert len(names) == 6 and all(isinstance(model.get_submodule(n), ODConv2d) for n in names)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        close(model.eval()(x), dense(x))
    extra = sum(m.macs(s)["total"] - m.macs(s)["conv"] for m, s in _input_shapes(model, x).items())
    assert count_macs(model, x) == pytest.approx(count_macs(dense, x) + extra, rel=1e-9)


def _input_shapes(model, x):
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, tuple(i[0].shape[1:])))
             for m in model.modules() if isinstance(m, ODConv2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


def test_model_file_round_trip_restores_the_function_and_temperature(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg.model_copy(update={"model": RESNET})
    p = method_params("odconv", {"temperature": {"start": 30.0, "end": 2.0, "epochs": 1}})
    odconv = methods.get("odconv")
    model, _ = odconv.build(RESNET, p, 1, 10, seed=0, dense=build_model(RESNET, 1, 10))
    for m in model.modules():
        if isinstance(m, ODConv2d):
            m.set_temperature(2.0)
            for head in m.heads.values():
                torch.nn.init.normal_(head.weight, std=0.3)
    loaded = round_trip(tmp_path / "o.pt", model, odconv, p, cfg)
    assert {m.temperature for m in loaded.modules() if isinstance(m, ODConv2d)} == {2.0}
