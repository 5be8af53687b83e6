"""MAC accounting: ptflops + operator hooks against independent counts."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.complexity import count_macs, count_params
from pipeline.models import build_model
from pipeline.ops.dynamic_conv import DynamicConv2d
from pipeline.ops.sd_conv import SDConv2d
from pipeline.ops.spatial_gate import gated_blocks

from .conftest import build_method, model_cfg


def flop_counter_macs(model, x) -> float:
    """torch.utils.flop_counter counts FLOPs = 2 x MACs of matmuls and convs.

    It sees ATen operators only, so the modules run their PyTorch paths (grouped conv, aggregation matmul)
    rather than the compiled kernels."""
    for m in model.modules():
        if hasattr(m, "use_native"):
            m.use_native = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() / 2 / len(x)


@pytest.mark.parametrize("cfg", [model_cfg(arch="cifar_resnet", depth=14), model_cfg(arch="cifar_mobilenetv2", width=0.5)])
def test_dense_count_matches_flop_counter(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, 1, 10)
    x = torch.randn(4, 1, 32, 32)
    ours = count_macs(model, x)
    ref = flop_counter_macs(model, x)
    assert ours == pytest.approx(ref, rel=0.01)


def _converted(method, **overrides):
    torch.manual_seed(0)
    backbone = model_cfg(arch="cifar_resnet", depth=8)
    dense = build_model(backbone, 1, 10).eval()
    model, _ = build_method(method, backbone, overrides, dense)
    return dense, model.eval()


def test_dynamic_model_count_matches_flop_counter():
    # flop_counter sees the grouped conv, the aggregation matmul and the routing linears.
    _, model = _converted("dynet", width=1.0)
    x = torch.randn(3, 1, 32, 32)
    assert count_macs(model, x) == pytest.approx(flop_counter_macs(model, x), rel=0.01)


def test_dynamic_count_is_the_sum_of_operator_formulas():
    dense, model = _converted("dynet", width=1.0)
    x = torch.randn(2, 1, 32, 32)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, tuple(i[0].shape[1:])))
             for m in model.modules() if isinstance(m, DynamicConv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    dyn = sum(m.macs(s)["total"] for m, s in shapes.items())
    static = sum(m.macs(s)["conv"] for m, s in shapes.items())
    # replacing the dynamic layers' cost by their dense conv cost gives the dense count
    assert count_macs(model, x) - dyn + static == pytest.approx(count_macs(dense, x), rel=1e-6)


def test_sdconv_counts_only_kept_weights():
    _, model = _converted("sdconv", width=1.0, init_sparsity=0.5)
    _, full = _converted("sdconv", width=1.0, init_sparsity=None)
    x = torch.randn(2, 1, 32, 32)
    assert count_macs(model, x) < count_macs(full, x)
    p = count_params(model)
    kept = sum(int(m.mask().sum()) for m in model.modules() if isinstance(m, SDConv2d))
    total_kernels = sum(m.weight.numel() for m in model.modules() if isinstance(m, SDConv2d))
    assert p["params"] - p["nonzero_params"] == total_kernels - kept


def test_open_gates_count_dense_plus_mask_units_and_closed_gates_only_mask_units():
    dense, model = _converted("dynconv")
    x = torch.randn(3, 1, 32, 32)
    dense_macs = count_macs(dense, x)
    blocks = gated_blocks(model)
    with torch.no_grad():
        model(x)
    gate_macs = sum(b.gate.macs((b.gate.in_channels, *b._in_size)) for b in blocks)
    gated_conv_macs = sum(b.dense_cost_per_image for b in blocks)
    assert count_macs(model, x) == pytest.approx(dense_macs + gate_macs, rel=1e-9)
    for b in blocks:
        b.gate.init_open(-10.0)  # closed: no position executes
    assert count_macs(model, x) == pytest.approx(dense_macs - gated_conv_macs + gate_macs, rel=1e-9)
