"""torchvision's ResNets and MobileNetV2 in the compiled plan (pipeline/ops/plan/torchvision.py): the window
gather (a 7x7 stride-2 stem) and max pooling against PyTorch's ops, and whole networks, dense and converted by
the methods, against their PyTorch forward at odd sizes, 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_plan_archs import set_untrained
from pipeline import methods
from pipeline.config import load_config
from pipeline.fold import fold_batchnorm
from pipeline.models import build_model, model_cfg
from pipeline.ops import native
from pipeline.ops.dynamic_conv import DynamicConv2d
from pipeline.ops.plan import Unsupported, compile_model
from pipeline.ops.plan.builder import PlanBuilder
from pipeline.ops.sparse_exec import to_sparse_execution
from pipeline.ops.spatial_gate import gated_blocks
from pipeline.paths import repo_root

from .test_model_plan import assert_matches, reference, run_batches


@pytest.fixture(scope="module", autouse=True)
def compiled():
    if not native.enabled():
        pytest.skip("PIPELINE_NATIVE=0")
    assert native.load() is not None, "the native kernels did not build (see the RuntimeWarning above)"


@pytest.fixture
def num_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


class ConvPool(nn.Module):
    """conv (any size) -> max pool -> head, with plan_into: the plan's window gather and max pooling alone."""

    def __init__(self, k: int, stride: int, pad: int, pool: tuple[int, int, int]):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, k, stride, pad)
        self.pool = nn.MaxPool2d(*pool)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(self.pool(self.conv(x))), 1))

    def plan_into(self, b):
        b.head("gap/fc", b.max_pool("pool", self.pool, b.conv("conv", self.conv, 0)), self.gap, self.fc)


@pytest.mark.parametrize(("k", "stride", "pad", "pool"), [(7, 2, 3, (3, 2, 1)), (5, 1, 2, (2, 2, 0)),
                                                          (3, 3, 0, (3, 1, 1)), (2, 2, 1, (3, 2, 0))])
def test_window_conv_and_max_pool_match_pytorch(k, stride, pad, pool, num_threads):
    """No activation before the pooling: the outputs are negative in places, so a padded position counted as a
    zero would win windows it must not. 2 threads: batch 1 shared by the threads and by one thread alone, batch 3
    an image per thread."""
    threads = 2
    num_threads(threads)
    torch.manual_seed(k)
    model = ConvPool(k, stride, pad, pool).eval()
    with torch.no_grad():
        model.conv.bias.sub_(0.5)
    plan, _ = compile_model(model, (3, 23, 18))
    gen = torch.Generator().manual_seed(1)
    run_batches(plan, lambda x: model(x).detach(), (3, 23, 18), threads, gen, batches=(1, 3))
    # The pooled maps themselves, not only their means: the maximum of each window, padding excluded.
    x = torch.randn(2, 3, 23, 18, generator=gen)
    b = PlanBuilder((3, 23, 18))
    out = b.max_pool("pool", model.pool, b.conv("conv", model.conv, 0))
    b.outputs(out)
    with torch.no_grad():
        expected = model.pool(model.conv(x))
    assert (expected < 0).any()
    assert_matches(b.plan.forward_maps(x)[0], expected)


class LargeMap(nn.Module):
    """1x1 and gathered-tap convs on maps of more than 1,024 positions, which run in packed chunks: a static and a
    dynamic 3x3 stride-2 conv (9 gathered taps), a 1x1 stride-2 projection (the centre tap) added in, a 1x1
    conv with a residual, max pooling, the head."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.down = nn.Conv2d(32, 48, 3, 2, 1)
        self.dyn = DynamicConv2d.from_conv(nn.Conv2d(32, 48, 3, 2, 1), num_kernels=3, noise_std=0.3, generator=gen)
        nn.init.normal_(self.dyn.routing[-1].weight, std=1.0, generator=gen)
        self.proj = nn.Conv2d(32, 48, 1, 2, 0)
        self.pw = nn.Conv2d(48, 48, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, 5)

    def forward(self, x):
        t = torch.relu(self.down(x) + self.proj(x))
        t = torch.relu(self.dyn(x) + t)
        t = self.pw(t) + t
        return self.fc(torch.flatten(self.gap(self.pool(t)), 1))

    def plan_into(self, b):
        res = b.conv("proj", self.proj, 0)
        t = b.conv("down", self.down, 0, res=res, act=b.ACT_RELU)
        t = b.conv("dyn", self.dyn, 0, res=t, act=b.ACT_RELU)
        t = b.conv("pw", self.pw, t, res=t)
        b.head("gap/fc", b.max_pool("pool", self.pool, t), self.gap, self.fc)


def test_convs_on_large_maps_run_in_packed_chunks_and_match_pytorch(num_threads):
    """Maps of 36 x 35 (1,260 positions) and 31 x 40 with 32 and 48 input channels: several chunks per thread
    (of one register tile for the 288 tap planes), a partial last one."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = LargeMap(gen).eval()
    for shape in ((32, 72, 70), (32, 61, 80)):
        plan, _ = compile_model(model, shape)
        num_threads(2)
        run_batches(plan, lambda x: reference(model, x), shape, 2, gen, batches=(1, 3))


def test_max_pool_refuses_what_it_does_not_run():
    b = PlanBuilder((3, 9, 9))
    with pytest.raises(Unsupported, match="floor-mode"):
        b.max_pool("p", nn.MaxPool2d(3, 2, 1, ceil_mode=True), 0)
    with pytest.raises(Unsupported, match="AvgPool2d"):
        b.max_pool("p", nn.AvgPool2d(3), 0)


def network(arch: str, variant: str, seed: int = 0) -> nn.Module:
    """A folded, eval-mode torchvision network (3 input channels, 10 classes), dense or converted by a method at
    the dense width, with weights and attentions that vary: SD-Conv half pruned, DynConv's masks partial."""
    cfg = load_config(repo_root() / "params.yaml")
    mcfg = model_cfg({"arch": arch, "width": 1.0, "weights": None})
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(mcfg, 3, 10)
    if variant != "dense":
        method = methods.get(variant)
        params = method.params(cfg)
        if "width" in type(params).model_fields:
            params = params.model_copy(update={"width": 1.0})
        model, _ = method.build(mcfg, params, 3, 10, seed, dense=model)
    set_untrained(model, gen, sparsity=0.5)
    with torch.no_grad():
        for block in gated_blocks(model):
            block.gate.conv.weight.normal_(0.0, 0.3, generator=gen)
            block.gate.conv.bias.fill_(-0.1)
    if gated_blocks(model):
        model = to_sparse_execution(model)
    return fold_batchnorm(model)[0]


CASES = [("resnet18", "dense"), ("resnet18", "dynet"), ("resnet18", "sdconv"), ("resnet18", "odconv"),
         ("resnet18", "dynconv"), ("resnet50", "dense"), ("resnet50", "dynet"), ("resnet50", "dynconv"),
         ("mobilenet_v2", "dense"),
         ("mobilenet_v2", "dynet"), ("mobilenet_v2", "odconv")]


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_torchvision_networks_match_their_forward(arch, variant, num_threads):
    """2 threads: batch 1 with the threads sharing each layer and with one thread, batch 3 a sample per thread."""
    threads = 2
    num_threads(threads)
    model = network(arch, variant)
    shape = (3, 37, 29)
    plan, _ = compile_model(model, shape)
    gen = torch.Generator().manual_seed(2)
    run_batches(plan, lambda x: reference(model, x), shape, threads, gen, batches=(1, 3))

