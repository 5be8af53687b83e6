"""The paper profiles end to end: each applied with `python -m stages.profile apply` to a committed copy of the
repository, pointed at a tiny synthetic data set in the real set's on-disk format (CIFAR pickles, an ImageNet
ImageFolder of JPEGs, streamed), shrunk to one epoch on 32 x 32 images, then `dvc repro` through the report.
The ImageNet profiles: tests/test_e2e_profiles_imagenet.py (a module of its own, so the two run in parallel)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from pipeline import profiles

from . import synthetic_data
from .e2e_project import _sh, copy_project

pytestmark = pytest.mark.e2e


def shrink(params: dict) -> None:
    """One epoch of every recipe on small batches and one thread, 32 x 32 images, torchvision's ResNets at a
    quarter width, a short latency stage."""
    def walk(node):
        if isinstance(node, dict):
            if "epochs" in node and "batch_size" in node:
                node.update(epochs=1, batch_size=8, eval_batch_size=64, threads=1)
            if "temperature" in node and isinstance(node["temperature"], dict):
                node["temperature"]["epochs"] = 0
            for value in node.values():
                walk(value)
    walk(params)
    if params["model"]["arch"].startswith("resnet"):  # torchvision's ResNets: a quarter of every stage's channels
        params["model"]["width"] = 0.25
    for ds in params["data"].values():
        if isinstance(ds, dict) and ds.get("source") == "imagefolder":
            ds.update(image_size=32, decode_threads=2, stats_images=16, val_fraction=0.34)
    # PyTorch alone, one session: the deployment runtimes and the intervals have end-to-end tests of their own
    params["latency"].update(batch_size=4, threads=[1], warmup=1, iterations=30, sessions=1, runtimes=[])
    params["report"]["samples_per_dataset"] = 8
    params["tracking"]["system_metrics_interval"] = 0  # the system metrics have end-to-end tests of their own


def apply(root, env, name: str, sets: list[str], transfer_dense: bool = True) -> None:
    subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=root, check=True)
    args = [sys.executable, "-m", "stages.profile", "apply", name, *[a for s in sets for a in ("--set", s)]]
    proc = _sh(args, root, env)
    assert f"applied '{name}'" in proc.stdout and "dvc repro" in proc.stdout
    params = yaml.safe_load((root / "params.yaml").read_text())
    shrink(params)
    if not transfer_dense:
        params["transfer"]["models"] = [m for m in params["transfer"]["models"] if m != "dense"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def reference_rows(report: str) -> list[list[str]]:
    """The rows of the report's table of the paper's numbers."""
    section = report.split("## The paper's numbers beside this run's", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")][1:]


def check_run(root, name: str) -> None:
    profile = profiles.load_profile(name)
    method = next(iter(profile["convert"]))
    assert (root / "results/convert" / method / "metrics.json").is_file()
    latency = json.loads((root / "results/latency.json").read_text())
    timed = {r["variant"] for r in latency["rows"]}
    assert "dense" in timed and any(v == method or v.startswith(f"{method}_") for v in timed), timed
    assert all(v.split("_")[0] in ("dense", method) for v in timed), timed  # this profile's only
    assert not any("searched" in v for v in timed)  # no search in a paper profile, so no searched variant
    report = (root / "reports/report.md").read_text()
    assert f"Profile `{name}`" in report
    rows = reference_rows(report)
    assert len(rows) == len(profile["reference"]["rows"])
    for row, ref in zip(rows, profile["reference"]["rows"]):
        assert row[0] == ref["model"] and row[1] == ref["metric"]
        assert re.fullmatch(r"-?[0-9.e+-]+", row[3]), row  # this run's value, measured


@pytest.fixture
def project(tmp_path):
    """A committed copy of the repository of the test's own (MLflow in a SQLite file beside it)."""
    root, env = copy_project(tmp_path / "project", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return root, env, tmp_path


def test_dynconv_cifar10_profile_reads_the_cifar_format(project):
    root, env, base = project
    synthetic_data.cifar("cifar10", base / "cifar", classes=10, train_per_class=8, test_per_class=3)
    synthetic_data.cifar("cifar100", base / "cifar", classes=100, train_per_class=3, test_per_class=1, seed=1)
    name = "dynconv-cifar10-resnet32-b07"
    apply(root, env, name, [f"data.upstream.root={base / 'cifar'}", f"data.downstream.root={base / 'cifar'}",
                            "data.downstream.val_fraction=0.34"])
    _sh(["dvc", "repro", "--no-commit"], root, env)  # no cache copies: a test's outputs
    card = json.loads((root / "data/prepared/card.json").read_text())
    assert card["tasks"]["upstream"]["classes"] == [f"class_{i}" for i in range(10)]
    assert sum(card["tasks"]["upstream"]["counts"][s] for s in ("train", "val")) == 80
    assert card["tasks"]["upstream"]["counts"]["test"] == 30
    assert len(card["tasks"]["downstream"]["classes"]) == 100
    check_run(root, name)
