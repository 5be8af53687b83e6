"""Shared fixtures: a tiny config, an isolated working directory and MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import parse_config

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "seed": 3,
    "data": {
        "upstream": {"renders": {"train": 1, "val": 1, "test": 1}},
        "downstream": {"max_train": 150, "renders": {"train": 1, "val": 1, "test": 1}},
    },
    "model": {"arch": "cifar_resnet", "depth": 8, "width": 0.5},
    "pretrain": {"epochs": 2, "batch_size": 64, "threads": 1, "schedule": {"name": "cosine", "warmup_epochs": 0}},
    "report": {"samples_per_dataset": 6},
}


@pytest.fixture
def tiny_cfg():
    return parse_config(TINY)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path
