"""Paper profiles: each applies to params.yaml and validates; the merge keeps params.yaml's comments, keeps only
the profile's methods, replaces a group whose variant changes; bad input stops with one line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline import profiles
from pipeline.config import ConfigError, parse_config, read_params
from pipeline.models import build_model
from pipeline.models.surgery import narrowed

from .conftest import REPO, config, model_cfg, params

NAMES = ["dynconv-cifar10-resnet32-b03", "dynconv-cifar10-resnet32-b05", "dynconv-cifar10-resnet32-b07",
         "dynet-imagenet-resnet18", "odconv-imagenet-resnet18", "sdconv-imagenet-resnet50"]


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


def test_the_papers_profiles_are_there():
    assert profiles.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_each_profile_applies_and_validates(params_file, name):
    profile = profiles.load_profile(name)
    applied = profiles.apply(name, params_file)
    cfg = parse_config(read_params(params_file))
    assert cfg.reference.profile == name and len(cfg.reference.rows) == len(profile["reference"]["rows"])
    assert list(cfg.convert) == list(profile["convert"])  # only the paper's method runs
    assert cfg.search.methods == {} and cfg.controls == []
    assert cfg.model.arch == profile["model"]["arch"] and cfg.data.upstream.source == profile["data"]["upstream"]["source"]
    method = next(iter(profile["convert"]))
    assert applied["convert"][method]["train"]["epochs"] == profile["convert"][method]["train"]["epochs"]
    for key, value in profile["convert"][method].items():  # the defaults fill what the profile leaves out
        if not isinstance(value, dict):
            assert applied["convert"][method][key] == value
    assert set(applied["convert"][method]) == set(params()["convert"][method])
    text = params_file.read_text()
    assert "# Every result depends only on this file" in text  # comments kept
    assert "train_seed: 0               # init, shuffling" in text


def test_dynet_profile_width_gives_the_papers_flops_cut_at_224():
    """The DyNet ResNet-18 profile's width: its narrowed backbone counts about the paper's MAC ratio (-68.2 %
    FLOPs) at 224 x 224 once the K = 4 coefficient branches are added (measured by bench_paper_shapes: 0.314)."""
    import torch

    from pipeline.complexity import count_macs

    p = profiles.load_profile("dynet-imagenet-resnet18")["convert"]["dynet"]
    dense_cfg = model_cfg(arch="resnet18")
    narrow = build_model(narrowed(dense_cfg, p["width"], "convert.dynet.width"), 3, 1000).eval()
    dense = build_model(dense_cfg, 3, 1000).eval()
    x = torch.zeros(1, 3, 224, 224)
    ratio = count_macs(narrow, x) / count_macs(dense, x)
    assert 0.28 < ratio < 0.318  # the coefficient branches add little; the narrowing does the cut
    assert all(m.out_channels % 8 == 0 for m in narrow.modules() if isinstance(m, torch.nn.Conv2d))


def test_a_second_profile_is_refused_and_the_file_kept(params_file):
    profiles.apply("dynconv-cifar10-resnet32-b05", params_file)
    before = params_file.read_text()
    with pytest.raises(ConfigError, match="already follows profile 'dynconv-cifar10-resnet32-b05'.*git checkout"):
        profiles.apply("odconv-imagenet-resnet18", params_file)
    assert params_file.read_text() == before


def test_set_pairs_apply_after_the_profile(params_file):
    applied = profiles.apply("dynet-imagenet-resnet18", params_file,
                             ["data.upstream.root=/datasets/imagenet", "convert.dynet.width=0.6"])
    assert applied["data"]["upstream"]["root"] == "/datasets/imagenet"
    assert applied["convert"]["dynet"]["width"] == 0.6


@pytest.mark.parametrize(("sets", "message"), [
    (["data.upstream.rooot=/x"], "'data.upstream.rooot' is not in params.yaml"),
    (["data.upstream.root"], "expected key=value"),
    (["convert.dynet.width=2.0"], "convert.dynet.width"),
])
def test_bad_set_pairs_stop_and_keep_the_file(params_file, sets, message):
    before = params_file.read_text()
    with pytest.raises(ConfigError, match=message):
        profiles.apply("dynet-imagenet-resnet18", params_file, sets)
    assert params_file.read_text() == before


def test_a_profile_with_an_unknown_key_or_another_name_is_refused(tmp_path, params_file):
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "mine.yaml").write_text(yaml.safe_dump({"pretrain": {"epochz": 3}, "reference": {"profile": "mine"}}))
    with pytest.raises(ConfigError, match="profile key 'pretrain.epochz' is not in params.yaml"):
        profiles.apply("mine", params_file, folder=folder)
    (folder / "other.yaml").write_text(yaml.safe_dump({"reference": {"profile": "mine"}}))
    with pytest.raises(ConfigError, match="reference.profile must be 'other'"):
        profiles.apply("other", params_file, folder=folder)


def test_the_command_says_what_is_wrong_in_one_line(params_file):
    proc = subprocess.run([sys.executable, "-m", "stages.profile", "apply", "nope", "--params", str(params_file)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "profile 'nope' not found" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "stages.profile", "list"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and all(name in proc.stdout for name in NAMES)


def test_reference_rows_name_models_of_the_run():
    raw = params({"reference": {"rows": [{"model": "dynconv", "metric": "test_acc", "value": 0.9, "source": "x"}]}})
    raw["convert"].pop("dynconv")
    raw["controls"] = [c for c in raw["controls"] if c not in ("random_mask", "uniform_mask")]
    raw["search"] = {k: v for k, v in raw["search"].items() if k != "dynconv"}
    raw["transfer"]["models"] = [m for m in raw["transfer"]["models"] if m != "dynconv"]
    with pytest.raises(ConfigError, match=r"reference.rows\[0\].model: 'dynconv' is not a model of this run"):
        parse_config(raw)


def test_narrowing_a_torchvision_net_that_cannot_be_narrowed_says_so():
    with pytest.raises(ConfigError, match="not shufflenet_v2"):
        narrowed(model_cfg(arch="shufflenet_v2"), 0.5, "convert.dynet.width")
    with pytest.raises(ConfigError, match="cannot start from model.weights"):
        narrowed(model_cfg(arch="resnet18", weights="w.pt"), 0.5, "convert.dynet.width")
