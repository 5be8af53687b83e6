"""Shared fixtures: configs derived from the repository's params.yaml, an isolated working directory
and MLflow store.

params.yaml is the only home of every value, so a test config is params.yaml with some keys
overridden (:func:`params`), never a schema default.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from pipeline import methods
from pipeline.config import ModelCfg, TrainCfg, parse_config, read_params

from . import pg_server

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """The longest modules first (end to end, then the ones marked slow), so that with pytest-xdist
    (`make test`: two workers, one module per worker at a time) they start at once and the short modules
    fill the other worker; the order within a module is kept."""
    def rank(item):
        return 0 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, mapping by mapping (a copy)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def params(overrides: dict | None = None) -> dict:
    """The repository's params.yaml as data, with ``overrides`` merged in."""
    return merge(read_params(REPO / "params.yaml"), overrides or {})


def config(overrides: dict | None = None):
    return parse_config(params(overrides))


def method_params(name: str, overrides: dict | None = None, cfg=None) -> Any:
    """The validated ``convert.<name>`` group of params.yaml, with ``overrides`` merged in."""
    cfg = cfg or config({"convert": {name: overrides or {}}})
    return methods.get(name).params(cfg)


def model_cfg(**fields) -> ModelCfg:
    """Backbone params: params.yaml's ``model`` with ``fields`` (another arch takes its own keys only)."""
    raw = params()["model"]
    if fields.get("arch", raw["arch"]) != raw["arch"]:
        raw = {}
    defaults = {"cifar_resnet": {"depth": 14, "width": 1.0, "base_width": 16}, "cifar_mobilenetv2": {"width": 1.0},
                **{a: {"width": 1.0, "weights": None} for a in ("resnet18", "resnet50", "resnet101", "mobilenet_v2",
                                                                  "shufflenet_v2")}}
    arch = fields.get("arch", raw.get("arch"))
    return TypeAdapter(ModelCfg).validate_python({"arch": arch, **defaults[arch], **raw, **fields})


def train_cfg(overrides: dict | None = None) -> TrainCfg:
    """params.yaml's ``pretrain`` group with ``overrides`` merged in."""
    return TrainCfg.model_validate(merge(params()["pretrain"], overrides or {}))


TINY = {
    "train_seed": 3,
    "data": {
        "seed": 3,
        "upstream": {"renders": {"train": 1, "val": 1, "test": 1}},
        "downstream": {"max_train": 150, "renders": {"train": 1, "val": 1, "test": 1}},
    },
    "model": {"arch": "cifar_resnet", "depth": 8, "width": 0.5},
    "pretrain": {"epochs": 2, "batch_size": 64, "threads": 1, "schedule": {"name": "cosine", "warmup_epochs": 0}},
    "report": {"samples_per_dataset": 6},
}


@pytest.fixture
def tiny_cfg():
    return config(TINY)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def build_method(name: str, backbone: ModelCfg, overrides: dict | None = None, dense=None, seed: int = 0,
                 in_channels: int = 1, num_classes: int = 10):
    """(model, converted names) of method ``name`` on ``backbone``, params.yaml's group with ``overrides``."""
    return methods.get(name).build(backbone, method_params(name, overrides), in_channels, num_classes, seed, dense)


def random_batchnorm(channels: int):
    """An eval-mode BatchNorm with random running statistics and affine parameters (folding tests)."""
    import torch

    bn = torch.nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def fold_into(conv, bn) -> None:
    """Fold the eval-mode ``bn`` into ``conv`` through the operator's ``fold_batchnorm(scale, shift)``."""
    import torch

    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        assert conv.fold_batchnorm(s, bn.bias - bn.running_mean * s)


def round_trip(path, model, method, p, cfg):
    """Save ``model`` as ``method``'s model file, load it back, check it computes the same function and
    folds its BatchNorms exactly (rtol 1e-5); returns the loaded model."""
    import torch

    from pipeline.fold import fold_batchnorm
    from pipeline.methods.files import load_any_model, save_method_model

    save_method_model(path, model, method, p, cfg, {"in_channels": 1, "num_classes": 10, "meta": {}})
    loaded, record, loaded_method = load_any_model(path)
    assert loaded_method is method and record["method"] == method.name
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
        folded, n = fold_batchnorm(loaded)
        ref = loaded(x)
        torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert n > 0
    return loaded


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for this test session (tests/pg_server.py)."""
    if pg_server.bindir() is None:
        if os.environ.get("PIPELINE_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (PIPELINE_REQUIRE_POSTGRES=1) but initdb is not installed")
        pytest.skip("PostgreSQL is not installed")
    with pg_server.running() as server:
        yield server
