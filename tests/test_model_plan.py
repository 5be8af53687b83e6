"""Whole-model compiled plan (pipeline/ops/plan) against the model's own PyTorch forward on random
inputs: static, dynamic (three coefficient activations), SD-Conv (pruned) and ODConv CIFAR ResNets and
MobileNetV2s, odd shapes and
channel counts, batch sizes that run sample-parallel and thread-shared, rebuilds, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.fold import fold_batchnorm
from pipeline.ops.plan import PlannedModel, Unsupported, compile_model, planned
from pipeline.models.cifar_mobilenetv2 import CifarMobileNetV2
from pipeline.models.cifar_resnet import CifarResNet
from pipeline.models.surgery import replace_module
from pipeline.ops import native
from pipeline.ops.dynamic_conv import DynamicConv2d
from pipeline.ops.odconv import ODConv2d
from pipeline.ops.sd_conv import SDConv2d
from pipeline.ops.sparse_exec import to_sparse_execution
from pipeline.ops.spatial_gate import GatedBasicBlock, GatedInvertedResidual

# Relative to the largest logit: the plan sums each output in another order than PyTorch's convs.
RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def compiled():
    if not native.enabled():
        pytest.skip("PIPELINE_NATIVE=0")
    assert native.load() is not None, "the native kernels did not build (see the RuntimeWarning above)"


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))


def resnet(kind: str, *, in_channels: int = 1, width: float = 0.5, activation: str = "softmax", k: int = 4,
           sparsity: float = 0.0, seed: int = 0) -> nn.Module:
    """A folded, eval-mode CIFAR ResNet-8 whose 3x3 convs (not the stem) are static, dynamic or SD-Conv."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CifarResNet(depth=8, width=width, in_channels=in_channels, num_classes=7)
    _randomize_bn(model, gen)
    if kind != "static":
        cls = SDConv2d if kind == "sdconv" else DynamicConv2d
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                 and n != "stem"]  # fmt: skip
        for name in names:
            conv = model.get_submodule(name)
            layer = cls.from_conv(conv, num_kernels=k, activation=activation, noise_std=0.3, generator=gen)
            nn.init.normal_(layer.routing[-1].weight, std=1.0, generator=gen)
            nn.init.normal_(layer.routing[2].weight, std=1.0, generator=gen)
            if activation == "softmax":
                layer.set_temperature(0.7)
            if sparsity:
                with torch.no_grad():  # pruned weights are zeros (threshold 0 keeps |W| > 0)
                    layer.weight.mul_(torch.rand(layer.weight.shape, generator=gen) >= sparsity)
            replace_module(model, name, layer)
        if activation != "softmax":  # BatchNorm folds into a mixture only when the coefficients sum to 1
            for block in (b for s in (1, 2, 3) for b in getattr(model, f"layer{s}")):
                block.bn1, block.bn2 = nn.Identity(), nn.Identity()
    model.eval()
    return fold_batchnorm(model)[0]


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's PyTorch forward with the per-layer compiled kernels off."""
    slow = copy.deepcopy(model)
    for m in slow.modules():
        if isinstance(m, DynamicConv2d):
            m.use_native = False
    with torch.no_grad():
        return slow(x)


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= RTOL * scale, float((got - expected).abs().max()) / scale


CASES = [
    # kind, keyword arguments, input [C, H, W]
    ("static", {}, (1, 32, 32)),
    ("dynamic", {"activation": "softmax"}, (1, 32, 32)),
    ("dynamic", {"activation": "sigmoid", "k": 3}, (3, 20, 28)),
    ("dynamic", {"activation": "linear", "k": 2, "width": 0.375}, (1, 17, 9)),  # 6/12/24 channels: not 4-blocks
    ("sdconv", {"sparsity": 0.85}, (1, 32, 32)),  # 4-channel blocks, entries grouped by the channels using them
    ("sdconv", {"sparsity": 0.3, "width": 1.0}, (3, 16, 16)),
    ("sdconv", {"sparsity": 0.7, "width": 0.375}, (1, 12, 12)),  # 1-channel blocks of nonzero entries
]


def run_batches(plan, model_or_expected, shape, threads, gen, batches=(1, 3, 4)) -> None:
    """Compare the plan with the reference at each batch size; with 2 threads batch 1 runs both ways (the
    threads sharing each layer, and one thread) and as the plan chooses, 3 and 4 run a sample per thread."""
    for batch in batches:
        x = torch.randn(batch, *shape, generator=gen)
        expected = model_or_expected(x)
        policies = (2, 1, 0) if threads > 1 and batch < threads else (0,)
        for policy in policies:
            plan.set_team_policy(policy)
            assert_matches(plan.forward(x), expected)
            if threads > 1 and batch < threads:
                assert plan.team(threads, batch) == {2: threads, 1: 1, 0: plan.team(threads, batch)}[policy]
                assert plan.team(threads, batch) in (1, threads)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1].values()))}-{c[2]}")
@pytest.mark.parametrize("threads", [1, 2])
def test_plan_matches_the_models_forward(case, threads):
    kind, kwargs, shape = case
    model = resnet(kind, in_channels=shape[0], **kwargs)
    plan, _ = compile_model(model, shape)
    gen = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_batches(plan, lambda x: reference(model, x), shape, threads, gen)
    finally:
        torch.set_num_threads(before)


def gated_resnet(open_bias: float, seed: int = 0, width: float = 0.5) -> tuple[nn.Module, nn.Module]:
    """A CIFAR ResNet-8 with DynConv-gated blocks (random mask units): the folded gated model (the dense
    masked reference) and its sparse-execution form (what the plan compiles)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CifarResNet(depth=8, width=width, in_channels=1, num_classes=5)
    _randomize_bn(model, gen)
    for s in (1, 2, 3):
        layer = getattr(model, f"layer{s}")
        for i, block in enumerate(layer):
            gated = GatedBasicBlock.from_block(block, open_bias)
            with torch.no_grad():
                gated.gate.conv.weight.normal_(0.0, 0.5, generator=gen)
                gated.gate.fc.weight.normal_(0.0, 0.5, generator=gen)
            layer[i] = gated
    model.eval()
    return fold_batchnorm(model)[0], fold_batchnorm(to_sparse_execution(model))[0]


@pytest.mark.parametrize("open_bias", [-50.0, 0.0, 50.0], ids=["closed", "partial", "open"])
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_blocks_match_the_dense_masked_model(open_bias, threads):
    gated, sparse = gated_resnet(open_bias, seed=5)
    plan, _ = compile_model(sparse, (1, 20, 24))
    gen = torch.Generator().manual_seed(2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    def expected(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = gated(x)
        fractions = [float(b.last_mask.mean()) for b in gated.modules() if isinstance(b, GatedBasicBlock)]
        if open_bias == 0.0:
            assert 0.05 < sum(fractions) / len(fractions) < 0.95, fractions  # masks really are partial
        return out

    try:
        run_batches(plan, expected, (1, 20, 24), threads, gen, batches=(1, 3))  # rows of 24: a vector and a part
    finally:
        torch.set_num_threads(before)


def test_sparse_layers_execute_only_nonzero_weights():
    model = resnet("sdconv", sparsity=0.85, seed=2)
    plan, _ = compile_model(model, (1, 16, 16))
    kept = plan.kept_entries()  # (multiplications per position the plan's blocks execute, dense count) per conv
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | DynamicConv2d)]
    assert len(kept) == 2 * len(layers)  # in build order: stem, then per block
    expected_kept = expected_dense = 0
    for m in layers:
        w = m.kernels() if isinstance(m, DynamicConv2d) else m.weight.unsqueeze(0)
        nonzero = (w != 0).any(0)  # a weight executes when nonzero in any of the K kernels
        expected_kept += int(nonzero.sum())
        expected_dense += nonzero.numel()
    assert sum(kept[0::2]) == expected_kept
    assert sum(kept[1::2]) == expected_dense
    assert expected_kept < 0.7 * expected_dense  # 1 - 0.85^4 of the dynamic layers' weights, stem and shortcuts dense


def test_planned_model_falls_back_and_follows_parameter_changes():
    model = resnet("dynamic", seed=3)
    wrapped = PlannedModel(model)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        first = wrapped(x)
        assert_matches(first, reference(model, x))
        with torch.no_grad():
            model.fc.bias.add_(1.0)  # in place: the plan sees the version change and is rebuilt
        assert_matches(wrapped(x), first + 1.0)
    y = wrapped(x)  # grad mode: the model itself
    assert y.requires_grad
    assert_matches(y.detach(), first + 1.0)


@pytest.mark.parametrize("what", ["bn", "no_plan", "training", "other_model", "dilated"])
def test_unsupported_models_are_refused_by_name(what):
    model = resnet("dynamic", seed=4)
    if what == "bn":
        model = CifarResNet(depth=8, width=0.5, in_channels=1).eval()  # BatchNorm not folded
        match = "bn"
    elif what == "no_plan":  # a block without plan_into: the dense-masked gated block
        model.layer2[0] = fold_batchnorm(GatedBasicBlock.from_block(model.layer2[0]).eval())[0]
        match = "layer2.0: GatedBasicBlock has no compiled plan"
    elif what == "training":
        model.train()
        match = "training"
    elif what == "other_model":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
        match = "Sequential"
    else:
        replace_module(model, "layer1.0.conv1", nn.Conv2d(8, 8, 3, padding=2, dilation=2))
        match = "layer1.0.conv1"
    with pytest.raises(Unsupported, match=match):
        compile_model(model, (1, 16, 16))
    assert planned(model) is model


def test_planned_compiles_for_the_models_input_channels():
    model = resnet("dynamic", in_channels=3, seed=6)
    wrapped = planned(model)
    assert isinstance(wrapped, PlannedModel)
    x = torch.randn(2, 3, 12, 20)
    with torch.no_grad():
        assert_matches(wrapped(x), reference(model, x))


def test_plan_rejects_a_wrong_input_shape():
    plan, _ = compile_model(resnet("static"), (1, 16, 16))
    with pytest.raises(RuntimeError, match="plan input must be"):
        plan.forward(torch.randn(1, 1, 16, 15))


def _randomize_odconv(layer: ODConv2d, gen: torch.Generator) -> None:
    """Attention heads and squeeze statistics away from their conversion values, so every attention varies
    with the input."""
    with torch.no_grad():
        for head in layer.heads.values():
            head.weight.normal_(0.0, 1.0, generator=gen)
            head.bias.normal_(0.0, 0.3, generator=gen)
        layer.bn.running_mean.normal_(0.0, 0.1, generator=gen)
        layer.bn.running_var.uniform_(0.5, 1.5, generator=gen)
        layer.bn.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bn.bias.normal_(0.0, 0.1, generator=gen)


def odconv_model(model: nn.Module, seed: int, kernels: tuple[int, ...] = (3,), **kwargs) -> nn.Module:
    """``model`` (random BN statistics) with every conv of the given kernel sizes but the stem as ODConv, eval
    mode, BN folded."""
    gen = torch.Generator().manual_seed(seed)
    _randomize_bn(model, gen)
    for name, conv in [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]:
        if name != "stem" and conv.kernel_size[0] in kernels:
            layer = ODConv2d.from_conv(conv, noise_std=0.3, generator=gen, **kwargs)
            _randomize_odconv(layer, gen)
            replace_module(model, name, layer)
    return fold_batchnorm(model.eval())[0]


def odconv_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model with every ODConv running its per-sample loop of Eq. 3 (``forward_reference``)."""
    slow = copy.deepcopy(model)
    for m in slow.modules():
        if isinstance(m, ODConv2d):
            m.forward = m.forward_reference
    with torch.no_grad():
        return slow(x)


ODCONV_CASES = [
    # ODConv keyword arguments, kernel sizes converted, input [C, H, W]
    ({"num_kernels": 4}, (3,), (1, 32, 32)),
    ({"num_kernels": 4, "temperature": 0.6}, (1, 3), (3, 19, 13)),  # 1x1 shortcuts too: no spatial attention
    ({"num_kernels": 1}, (3,), (1, 16, 16)),  # no kernel attention
    ({"num_kernels": 2, "attentions": ("kernel", "channel")}, (3,), (1, 12, 20)),
]


@pytest.mark.parametrize("case", ODCONV_CASES, ids=lambda c: "-".join(map(str, c[0].values())) + f"-{c[1]}")
@pytest.mark.parametrize("threads", [1, 2])
def test_odconv_plan_matches_the_per_sample_reference(case, threads):
    kwargs, kernels, shape = case
    torch.manual_seed(7)
    model = odconv_model(CifarResNet(depth=8, width=0.5, in_channels=shape[0], num_classes=6), 7, kernels, **kwargs)
    assert any(isinstance(m, ODConv2d) for m in model.modules())
    plan, _ = compile_model(model, shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_batches(plan, lambda x: odconv_reference(model, x), shape, threads, torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(before)


def mobilenet(kind: str, seed: int = 0, width: float = 0.5, in_channels: int = 3) -> nn.Module:
    """A folded, eval-mode CIFAR MobileNetV2 whose depthwise and 1x1 convs (not the stem) are static, DyNet
    mixtures (softmax or sigmoid), SD-Conv (pruned) or ODConv."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CifarMobileNetV2(width=width, in_channels=in_channels, num_classes=5, last_channels=64)
    if kind == "odconv":
        return odconv_model(model, seed, (1, 3), num_kernels=3)
    _randomize_bn(model, gen)
    if kind != "static":
        activation = "sigmoid" if kind == "dynamic_sigmoid" else "softmax"
        cls = SDConv2d if kind == "sdconv" else DynamicConv2d
        for name, conv in [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and n != "stem"]:
            layer = cls.from_conv(conv, num_kernels=3, activation=activation, noise_std=0.3, generator=gen)
            nn.init.normal_(layer.routing[-1].weight, std=1.0, generator=gen)
            if kind == "sdconv":
                with torch.no_grad():
                    layer.weight.mul_(torch.rand(layer.weight.shape, generator=gen) >= 0.7)
            replace_module(model, name, layer)
        if activation != "softmax":
            for block in model.blocks:
                block.bn1, block.bn2, block.bn3 = nn.Identity(), nn.Identity(), nn.Identity()
            model.head_bn = nn.Identity()
    return fold_batchnorm(model.eval())[0]


@pytest.mark.parametrize(("kind", "shape"), [
    *[(kind, (3, 15, 13)) for kind in ("static", "dynamic", "dynamic_sigmoid", "sdconv", "odconv")],
    ("static", (3, 34, 31)), ("sdconv", (3, 34, 31)),
    # 32 -> 16 -> 8 -> 4 (the default CIFAR shape): every 1x1 conv packed, vectors of one, two and four map rows
    ("static", (3, 32, 32)), ("dynamic", (3, 32, 32)),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_mobilenetv2_plan_matches_the_models_forward(kind, shape, threads):
    """Odd sizes: 15 x 13 -> 8 x 7 -> 4 x 4 -> 2 x 2 through the stride-2 stages, every 1x1 conv on packed
    positions; 34 x 31 (more than 1,024 positions) runs the first stages' 1x1 convs on padded planes."""
    model = mobilenet(kind, seed=11)
    plan, _ = compile_model(model, shape)
    ref = reference  # ODConv's forward_reference covers ungrouped convs; its depthwise ones: the grouped conv
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_batches(plan, lambda x: ref(model, x), shape, threads, torch.Generator().manual_seed(4), batches=(1, 3))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_dense_block_after_sparse_ones_reads_their_rows_as_planes(threads):
    gated, sparse = gated_resnet(0.0, seed=8)
    gen = torch.Generator().manual_seed(8)
    dense_block = CifarResNet(depth=8, width=0.5, in_channels=1).layer3[0]
    _randomize_bn(dense_block, gen)
    for model in (gated, sparse):
        model.layer3[0] = fold_batchnorm(copy.deepcopy(dense_block).eval())[0]
    plan, _ = compile_model(sparse, (1, 16, 16))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_batches(plan, lambda x: reference(gated, x), (1, 16, 16), threads, gen, batches=(1, 3))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("open_bias", [-50.0, 0.0, 50.0], ids=["closed", "partial", "open"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gated_inverted_residuals_match_the_dense_masked_model(open_bias, threads):
    """DynConv's MobileNetV2: every stride-1 residual block gated (expand at the dilated mask, depthwise and
    project at the mask), the others dense between them (rows and planes meet both ways)."""
    torch.manual_seed(9)
    gen = torch.Generator().manual_seed(9)
    model = CifarMobileNetV2(width=0.5, in_channels=3, num_classes=5, last_channels=64)
    _randomize_bn(model, gen)
    for i, block in enumerate(model.blocks):
        if block.use_res:
            gated = GatedInvertedResidual.from_block(block, open_bias)
            with torch.no_grad():
                gated.gate.conv.weight.normal_(0.0, 0.5, generator=gen)
                gated.gate.fc.weight.normal_(0.0, 0.5, generator=gen)
            model.blocks[i] = gated
    model.eval()
    gated_model, sparse = fold_batchnorm(model)[0], fold_batchnorm(to_sparse_execution(model))[0]
    shape = (3, 17, 14)
    plan, _ = compile_model(sparse, shape)

    def expected(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = gated_model(x)
        if open_bias == 0.0:
            fractions = [float(b.last_mask.mean()) for b in gated_model.modules() if isinstance(b, GatedInvertedResidual)]
            assert 0.05 < sum(fractions) / len(fractions) < 0.95, fractions
        return out

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_batches(plan, expected, shape, threads, gen, batches=(1, 3))
    finally:
        torch.set_num_threads(before)
