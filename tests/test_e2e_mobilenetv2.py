"""End to end on the MobileNetV2 backbone: the tiny profile with ``model.arch: cifar_mobilenetv2`` and the
DyNet conversion, run up to the latency stage: the dense model and DyNet's run in the compiled plan, with
the function of their PyTorch models (every other method's MobileNetV2 plan: tests/test_model_plan.py)."""

from __future__ import annotations

import json

import pytest

from .e2e_project import _sh, copy_project

pytestmark = pytest.mark.e2e
METHODS = ("dynet",)


def mobilenetv2(params: dict) -> None:
    params["model"] = {"arch": "cifar_mobilenetv2", "width": 0.25}
    params["pretrain"]["epochs"] = 1  # timing and the plan's function need no accuracy
    params["pretrain"]["schedule"]["warmup_epochs"] = 0
    params["convert"] = {m: params["convert"][m] for m in METHODS}
    params["controls"] = []
    params["search"] = {}
    params["transfer"]["models"] = ["dense"]


@pytest.fixture(scope="module")
def latency(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e-mobilenetv2")  # MLflow in a SQLite file: tests/test_e2e.py runs the server
    root, env = copy_project(base / "project", f"sqlite:///{base / 'mlflow.db'}", mobilenetv2)
    _sh(["dvc", "repro", "latency"], root, env)
    return json.loads((root / "results/latency.json").read_text())


def test_every_method_runs_in_the_compiled_plan(latency):
    engines = {r["variant"]: r["runtime"] for r in latency["rows"] if r["batch"] == 1}
    best = engines.pop("dense")  # repeats the fastest dense runtime, which may be the compiled plan
    assert best == next(r["best_dense"] for r in latency["rows"] if r["batch"] == 1)
    assert {v for v, e in engines.items() if e == "native"} == {"dense_native", *METHODS}, engines
    assert all(c["max_abs_diff"] < 1e-3 for c in latency["runtimes"].values())
    for v in METHODS:  # BN folded and summed in another order: no flips
        assert abs(latency["accuracy"][v]["acc_change"]) < 0.01
    assert all(r["median_ms"] > 0 and r["speedup_vs_dense"] > 0 for r in latency["rows"])
