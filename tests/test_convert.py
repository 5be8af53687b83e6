"""Conversion of the dense model into each method's model, and method model files."""

import pytest
import torch

from pipeline import methods
from pipeline.methods.files import load_any_model, save_method_model
from pipeline.methods.sdconv import init_thresholds
from pipeline.models import build_model
from pipeline.models.surgery import conv_names, narrow_copy
from pipeline.ops.sd_conv import SDConv2d

from .conftest import build_method, method_params, model_cfg

RESNET = model_cfg(arch="cifar_resnet", depth=8)


@pytest.fixture
def dense():
    torch.manual_seed(0)
    model = build_model(RESNET, 1, 10)
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_auto_layers_are_every_3x3_but_the_stem(dense):
    names = conv_names(dense, "auto")
    assert "stem" not in names
    assert names == [f"layer{s}.0.conv{c}" for s in (1, 2, 3) for c in (1, 2)]
    assert conv_names(dense, ["layer3.*"]) == ["layer3.0.conv1", "layer3.0.conv2", "layer3.0.shortcut.0"]


@pytest.mark.parametrize("method", ["dynet", "sdconv", "dynconv"])
def test_conversion_at_full_width_starts_as_the_dense_function(dense, method):
    overrides = {"dynet": {"noise_std": 0.0, "width": 1.0},
                 "sdconv": {"noise_std": 0.0, "width": 1.0, "init_sparsity": None}, "dynconv": {}}[method]
    model, names = build_method(method, RESNET, overrides, dense)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), dense(x), atol=1e-4, rtol=1e-4)
    assert len(names) == (3 if method == "dynconv" else 6)


def test_narrow_copy_takes_the_leading_channels(dense):
    narrow = build_model(RESNET.model_copy(update={"width": 0.5}), 1, 10)
    narrow_copy(dense, narrow)
    w, n = dense.layer2[0].conv1.weight, narrow.layer2[0].conv1.weight
    assert n.shape == (16, 8, 3, 3) and torch.equal(n, w[:16, :8])
    assert torch.equal(narrow.fc.bias, dense.fc.bias)


@pytest.mark.parametrize("granularity", ["layer", "kernel", "filter", "channel"])
def test_init_thresholds_prunes_the_requested_fraction(granularity):
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    layer = SDConv2d.from_conv(conv, granularity=granularity, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    init_thresholds(layer, 0.6)
    assert layer.kernel_sparsity() == pytest.approx(0.6, abs=0.06)


def test_saved_method_model_rebuilds_identically(dense, tmp_path, tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"model": RESNET})
    p = method_params("sdconv", {"init_sparsity": 0.5})
    model, _ = methods.get("sdconv").build(RESNET, p, 1, 10, seed=0, dense=dense)
    record = {"in_channels": 1, "num_classes": 10, "meta": {"mean": [0.1], "std": [0.2]}}
    save_method_model(tmp_path / "m.pt", model, methods.get("sdconv"), p, cfg, record)
    loaded, rec, method = load_any_model(tmp_path / "m.pt")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert rec["method"] == "sdconv" and method is methods.get("sdconv")
    # the file holds only the kept kernel weights of every SD-Conv layer
    kept = {n: int(m.mask().sum()) for n, m in model.named_modules() if isinstance(m, SDConv2d)}
    assert {n: t._nnz() for n, t in rec["extra"].items()} == kept
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in kept for k in rec["state_dict"])
