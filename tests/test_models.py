import pytest
import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models import build_model, load_model, save_model
from pipeline.models.surgery import classifier

from .conftest import model_cfg


@pytest.mark.parametrize(
    "cfg, size",
    [
        (model_cfg(arch="cifar_resnet", depth=8), 32),
        (model_cfg(arch="cifar_resnet", depth=20, width=0.5), 32),
        (model_cfg(arch="cifar_mobilenetv2", width=0.5), 32),
        (model_cfg(arch="resnet18"), 64),
        (model_cfg(arch="mobilenet_v2"), 64),
        (model_cfg(arch="shufflenet_v2"), 64),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape(cfg, size, channels):
    model = build_model(cfg, channels, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert classifier(model).out_features == 7


def test_cifar_resnet_structure_and_conv_names():
    model = build_model(model_cfg(arch="cifar_resnet", depth=14, width=1.0), 1, 10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert "stem" in convs and "layer1.0.conv1" in convs and "layer3.1.conv2" in convs
    assert "layer2.0.shortcut.0" in convs  # 1x1 projection where the width doubles
    assert len([n for n in convs if n.endswith(("conv1", "conv2"))]) == 2 * 2 * 3  # 2 blocks x 3 stages x 2 convs
    assert convs["layer3.0.conv1"].out_channels == 64
    half = build_model(model_cfg(arch="cifar_resnet", depth=14, width=0.5), 1, 10)
    assert half.get_submodule("layer3.0.conv1").out_channels == 32


def test_save_load_round_trip_and_truncation(tmp_path):
    cfg = model_cfg(arch="cifar_resnet", depth=8)
    model = build_model(cfg, 1, 10).eval()
    path = tmp_path / "m.pt"
    save_model(path, model, cfg, 1, 10, mean=[0.1], std=[0.2])
    loaded, record = load_model(path)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
    assert record["meta"]["mean"] == [0.1]
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(path)


def test_local_torchvision_weights_are_loaded(tmp_path):
    ref = build_model(model_cfg(arch="resnet18"), 3, 1000)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    model = build_model(model_cfg(arch="resnet18", weights=str(tmp_path / "w.pt")), 3, 5)
    assert torch.equal(model.conv1.weight, ref.conv1.weight)
    assert model.fc.out_features == 5
    with pytest.raises(CheckpointError, match="not found"):
        build_model(model_cfg(arch="resnet18", weights=str(tmp_path / "none.pt")), 3, 5)
