"""The controls on a tiny profile: each is its method's recipe without the ingredient under test, and
matches what it controls on the measured quantity (width, kernel sparsity per layer, executed fraction
per block)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline import methods
from pipeline.errors import ConfigError
from pipeline.methods.files import load_any_model
from pipeline.ops.dynamic_conv import DynamicConv2d
from pipeline.ops.fixed_masks import RandomMask, UniformMask, bayer, density_for_fraction, expected_fraction
from pipeline.ops.spatial_gate import expand_mask
from pipeline.ops.spatial_gate import gated_blocks
from stages import convert, prepare, pretrain, report

from .conftest import TINY, config, merge

pytestmark = pytest.mark.slow

ONE_EPOCH = {"train": {"epochs": 1, "threads": 1}}
CFG = merge(TINY, {"convert": {"dynet": {**ONE_EPOCH, "temperature": {"epochs": 0}},
                               "sdconv": {**ONE_EPOCH, "temperature": {"epochs": 0}},
                               "dynconv": ONE_EPOCH},
                   "controls": ["static", "magnitude", "random_mask", "uniform_mask"]})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controls")
    old = os.getcwd()
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    cfg = config(CFG)
    try:
        prepare.main(cfg)
        pretrain.main(cfg)
        for name in ("dynet", "sdconv", "dynconv", *cfg.controls):
            convert.main(cfg, name)
        yield folder, cfg
    finally:
        os.chdir(old)
        del os.environ["MLFLOW_TRACKING_URI"]


def metrics(folder, name):
    return json.loads((folder / f"results/convert/{name}/metrics.json").read_text())


def layers(folder, name):
    return json.loads((folder / f"results/convert/{name}/layers.json").read_text())


def test_static_is_dynets_backbone_without_dynamic_kernels(pipeline):
    folder, _ = pipeline
    model, record, method = load_any_model(folder / "models/static.pt")
    assert method.control_of == "dynet" and record["method"] == "static"
    assert not any(isinstance(m, DynamicConv2d) for m in model.modules())
    assert metrics(folder, "static")["width"] == metrics(folder, "dynet")["width"] == 0.5 * TINY["model"]["width"]
    assert metrics(folder, "static")["macs_per_image"] < metrics(folder, "dynet")["macs_per_image"]


def test_magnitude_prunes_each_layer_to_sdconvs_sparsity(pipeline):
    folder, _ = pipeline
    ours, theirs = layers(folder, "magnitude")["kernel_sparsity"], layers(folder, "sdconv")["kernel_sparsity"]
    assert ours.keys() == theirs.keys()
    for name in ours:  # frozen masks: fine-tuning kept the sparsity it started with
        assert ours[name] == pytest.approx(theirs[name], abs=0.02)


@pytest.mark.parametrize("control", ["random_mask", "uniform_mask"])
def test_mask_controls_execute_dynconvs_fraction_per_block(pipeline, control):
    folder, _ = pipeline
    ours, theirs = layers(folder, control)["executed_fraction"], layers(folder, "dynconv")["executed_fraction"]
    assert ours.keys() == theirs.keys()
    tolerance = 0.03 if control == "random_mask" else 0.2  # a pattern reaches only some fractions
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=tolerance)
    model, _, _ = load_any_model(folder / f"models/{control}.pt")
    unit = RandomMask if control == "random_mask" else UniformMask
    assert all(isinstance(b.gate, unit) for b in gated_blocks(model))


def test_controls_are_in_the_report_and_their_claims_judged(pipeline):
    folder, cfg = pipeline
    report.main(cfg)
    md = (folder / "reports/report.md").read_text()
    assert "control: static" in md and "control: magnitude pruning" in md
    verdicts = md.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
    assert "static control" in verdicts
    assert not [c for c in cfg.controls if f"not run (control {c} " in verdicts]  # every control that ran is judged
    assert "not run (control unshared_warehouse off" in verdicts  # and one left out of `controls` says so


def test_density_matches_the_fraction_it_was_solved_for():
    for kind in ("random", "uniform"):
        for target in (0.3, 0.6, 0.9):
            d = density_for_fraction(kind, target, 16, 16, 9 * 64, 9 * 64)
            got = expected_fraction(kind, d, 16, 16, 9 * 64, 9 * 64)
            assert got >= target - 1e-6 and (kind == "uniform" or got == pytest.approx(target, abs=1e-3))


def test_random_mask_fraction_matches_its_expectation():
    torch.manual_seed(0)
    unit = RandomMask(8, 1, density=0.3)
    masks = unit(torch.zeros(200, 8, 16, 16))
    assert masks.mean().item() == pytest.approx(0.3, abs=0.01)
    dilated = torch.nn.functional.max_pool2d(masks, 3, 1, 1).mean().item()
    expected = expected_fraction("random", 0.3, 16, 16, 1, 0)  # dilated part only
    assert dilated == pytest.approx(expected, abs=0.01)


def test_uniform_mask_is_the_same_evenly_spread_pattern_for_every_image():
    unit = UniformMask(8, 1, density=0.25)
    m = unit(torch.randn(3, 8, 16, 16))
    assert torch.equal(m[0], m[1]) and m.mean().item() == pytest.approx(0.25)
    assert sorted(bayer(4).flatten().tolist()) == [(i + 0.5) / 16 for i in range(16)]


def test_controls_are_validated():
    with pytest.raises(ConfigError, match="dynet is a method, not a control"):
        methods.validate(config({"controls": ["dynet"]}))
    with pytest.raises(ConfigError, match="unknown method 'placebo'"):
        methods.validate(config({"controls": ["placebo"]}))


@pytest.mark.parametrize("kind", ["random", "uniform"])
def test_fraction_on_a_strided_bottlenecks_input_grid_matches_sampled_masks(kind):
    """A stride-2 bottleneck's conv1 runs on the input grid (expand_mask): the expectation the controls solve
    for matches masks drawn from the control's own gate, measured with the block's own dilation."""
    torch.manual_seed(1)
    unit = (RandomMask if kind == "random" else UniformMask)(8, 2, density=0.2)
    masks = unit(torch.zeros(300, 8, 15, 16))  # 8 x 8 outputs of a 15 x 16 input
    dilated = expand_mask(masks, 2, (15, 16))
    dc, mc = 3, 5
    sampled = ((dilated.sum((1, 2, 3)) * dc + masks.sum((1, 2, 3)) * mc) / (15 * 16 * dc + 64 * mc)).mean().item()
    expected = expected_fraction(kind, 0.2, 8, 8, dc, mc, 2, (15, 16))
    assert sampled == pytest.approx(expected, abs=0.01 if kind == "random" else 1e-6)
    d = density_for_fraction(kind, expected, 8, 8, dc, mc, 2, (15, 16))
    assert expected_fraction(kind, d, 8, 8, dc, mc, 2, (15, 16)) == pytest.approx(expected, abs=1e-3)
