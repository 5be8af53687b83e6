"""KernelWarehouse: the batched operator against the cell-by-cell reference, warehouse sharing and sizes,
the temperature initialisation, MACs against the flop counter, BN folding, and the method through the
registry (conversion, parameters, model file round trip)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline import methods
from pipeline.complexity import count_macs, count_params
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.ops.kernel_warehouse import KWConv2d, Warehouse, assignment, convert_convs, plan_warehouses
from pipeline.models.surgery import replace_module

from .conftest import build_method, config, fold_into, method_params, model_cfg, random_batchnorm, round_trip

RTOL = 1e-5
RESNET = model_cfg(arch="cifar_resnet", depth=8)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * b.abs().max().item())


def random_layer(cin=8, cout=12, stride=1, cells=(4, 4), budget=1.0, tau=0.3, seed=0, bias=False) -> KWConv2d:
    """A layer on a random warehouse whose attention varies across samples."""
    torch.manual_seed(seed)
    m = 9 * (cout // cells[0]) * (cin // cells[1])
    wh = Warehouse(max(1, int(m * budget)), *cells)
    with torch.no_grad():
        wh.cells.normal_()
    layer = KWConv2d(cin, cout, 3, stride, 1, warehouse=wh, assigned=assignment(0, m, budget, wh.num_cells), bias=bias)
    with torch.no_grad():
        layer.fc2.weight.normal_(0.0, 0.5)
        layer.norm.running_mean.uniform_(-0.1, 0.1)
        layer.norm.running_var.uniform_(0.5, 1.5)
        if bias:
            layer.bias.normal_()
    layer.set_temperature(tau)
    return layer.eval()


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2}, {"budget": 0.5}, {"budget": 2.0, "tau": 0.0},
                                    {"cin": 4, "cout": 8, "cells": (8, 2), "tau": 1.0, "bias": True}])
def test_forward_equals_the_cell_by_cell_reference(kwargs):
    layer = random_layer(**kwargs)
    x = torch.randn(3, layer.in_channels, 9, 7)
    with torch.no_grad():
        close(layer(x), layer.forward_reference(x))


def test_attention_is_normalised_by_absolute_values_and_can_be_negative():
    layer = random_layer(tau=0.0)
    alpha = layer.attention(torch.randn(4, 8, 6, 6))
    full = layer.fc2(torch.relu(layer.norm(layer.fc1(torch.randn(1, 8)))))
    assert (alpha < 0).any() and (alpha > 0).any()
    assert (alpha.abs().sum(-1) <= 1.0 + 1e-6).all()  # the zero cell's share is dropped
    assert full.shape[-1] == layer.num_mixtures * (layer.warehouse.num_cells + 1)


def test_temperature_one_is_the_assignment_and_gradients_reach_the_shared_cells():
    layer = random_layer(tau=1.0)
    x = torch.randn(2, 8, 5, 5)
    alpha = layer.attention(x)
    assert torch.equal(alpha, layer.gamma[:, :-1].expand_as(alpha))
    layer.train()
    layer(x).square().sum().backward()
    assert layer.warehouse.cells.grad.abs().sum() > 0


def test_assignment_gives_every_mixture_its_own_cell_at_budget_one_and_shares_below():
    assert assignment(0, 6, 1.0, 6) == [0, 1, 2, 3, 4, 5]
    assert assignment(3, 3, 2.0, 12) == [6, 8, 10]
    assert assignment(0, 6, 0.5, 3) == [0, 3, 1, 3, 2, 3]  # 3 = the zero cell


def test_warehouses_are_shared_per_stage_and_sized_by_the_budget():
    dense = build_model(RESNET, 1, 10)
    model, names = build_method("kernelwarehouse", RESNET, {"width": 1.0, "budget": 0.5}, dense)
    layers = [model.get_submodule(n) for n in names]
    assert all(isinstance(m, KWConv2d) for m in layers)
    by_stage = {}
    for name, m in zip(names, layers):
        by_stage.setdefault(name.split(".")[0], set()).add(id(m.warehouse))
    assert all(len(ids) == 1 for ids in by_stage.values()) and len(by_stage) == 3
    for stage, ids in by_stage.items():
        members = [m for n, m in zip(names, layers) if n.startswith(stage + ".")]
        assert members[0].warehouse.num_cells == int(sum(m.num_mixtures for m in members) * 0.5)
    unshared, _ = build_method("kernelwarehouse", RESNET, {"width": 1.0, "share": "layer"}, dense)
    assert len({id(unshared.get_submodule(n).warehouse) for n in names}) == len(names)


def test_plan_takes_the_gcd_of_the_channels_as_cell_shape():
    convs = [("a.0", nn.Conv2d(16, 32, 3)), ("a.1", nn.Conv2d(32, 32, 3)), ("b.0", nn.Conv2d(32, 64, 3))]
    plan = plan_warehouses(convs, lambda n: n.split(".")[0], 1.0)
    assert plan == {"a": (9 * 1 + 9 * 2, 32, 16), "b": (9, 64, 32)}


def test_converted_model_starts_as_the_dense_model_at_any_temperature():
    torch.manual_seed(0)
    dense = build_model(RESNET, 1, 10).eval()
    model, names = build_method("kernelwarehouse", RESNET, {"width": 1.0, "noise_std": 0.0}, dense)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        close(model.eval()(x), dense(x))
        for n in names:
            model.get_submodule(n).set_temperature(0.0)  # the attention alone: its start is the assignment
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=1e-2 * dense(x).abs().max().item())
        assert not torch.equal(model(x), dense(x))  # 1 / (1 + EPS) per layer


def test_grouped_convs_are_refused_with_the_key():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match="ungrouped"):
        convert_convs(model, [("0", model[0])], lambda n: n, 1.0, reduction=0.0625, min_hidden=16, noise_std=0.0,
                      generator=torch.Generator(), replace=replace_module)
    kw = methods.get("kernelwarehouse")
    with pytest.raises(ConfigError, match="convert.kernelwarehouse.layers"):
        kw.build(RESNET, method_params("kernelwarehouse", {"layers": ["nothing*"]}), 1, 10, 0)


def test_mac_count_is_the_flop_counter_of_the_forward():
    layer = random_layer(stride=2)
    x = torch.randn(3, 8, 16, 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    macs = layer.macs((8, 16, 16))
    assert macs["total"] == pytest.approx(counter.get_total_flops() / 2 / len(x), rel=1e-9)
    assert layer.counted_macs(x) == macs["total"] * 3


def test_parameters_count_each_shared_warehouse_once():
    dense = build_model(RESNET, 1, 10)
    model, names = build_method("kernelwarehouse", RESNET, {"width": 1.0}, dense)
    layers = [model.get_submodule(n) for n in names]
    warehouses = {id(m.warehouse): m.warehouse.cells.numel() for m in layers}
    own = sum(p.numel() for m in layers for n, p in m.named_parameters() if not n.startswith("warehouse."))
    converted = sum(m.weight.numel() for n, m in dense.named_modules() if n in names)
    assert count_params(model)["params"] == count_params(dense)["params"] - converted + own + sum(warehouses.values())
    assert sum(warehouses.values()) == converted  # budget 1 x: the warehouses hold as many weights as the kernels


def test_batchnorm_folds_into_an_output_scale_and_bias():
    layer, bn = random_layer(bias=True), random_batchnorm(12)
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        ref = bn(layer(x))
        fold_into(layer, bn)
        close(layer(x), ref)
        close(layer.forward_reference(x), ref)


def test_model_file_round_trip_keeps_the_sharing_the_function_and_the_temperature(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg.model_copy(update={"model": RESNET})
    p = method_params("kernelwarehouse", {"width": 1.0, "temperature": {"start": 1.0, "end": 0.25, "epochs": 1}})
    kw = methods.get("kernelwarehouse")
    model, names = kw.build(RESNET, p, 1, 10, seed=0, dense=build_model(RESNET, 1, 10))
    for _, m in kw.layers(model):
        m.set_temperature(0.25)
        torch.nn.init.normal_(m.fc2.weight, std=0.3)
    loaded = round_trip(tmp_path / "kw.pt", model, kw, p, cfg)
    assert {m.temperature for _, m in kw.layers(loaded)} == {0.25}
    a, b = loaded.get_submodule(names[0]), loaded.get_submodule(names[1])
    assert a.warehouse is b.warehouse  # the sharing survives the file
    x = torch.randn(3, 1, 32, 32)
    assert count_macs(loaded, x) > count_macs(build_model(RESNET, 1, 10), x)


def test_the_unshared_control_keeps_the_recipe_with_one_warehouse_per_conv():
    control, kw = methods.get("unshared_warehouse"), methods.get("kernelwarehouse")
    cfg = config()
    assert control.control_of == "kernelwarehouse" and control.params(cfg).share == "layer"
    assert control.params(cfg).model_copy(update={"share": "stage"}) == kw.params(cfg)
    dense = build_model(RESNET, 1, 10)
    model, names = control.build(RESNET, control.params(cfg).model_copy(update={"width": 1.0}), 1, 10, 0, dense)
    assert len({id(model.get_submodule(n).warehouse) for n in names}) == len(names)
    assert "acc_vs_unshared" in {c.name for c in kw.claims()}
