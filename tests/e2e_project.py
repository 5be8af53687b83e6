"""Fixtures of the end-to-end tests: a real MLflow tracking server (PostgreSQL backend store, artifacts
served by the server, on 127.0.0.1) and a committed copy of the repository with a tiny profile.

A test module uses them by importing them (``from .e2e_project import project, tracking_server``); each
module gets its own server and copy, so modules can run in separate pytest-xdist workers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline import methods
from pipeline.config import load_config

from .conftest import REPO

CFG = load_config(REPO / "params.yaml")
METHODS = list(CFG.convert)
SEARCHED = list(CFG.search.methods)
TRANSFERRED = [m.name for m in methods.transferred(CFG)]
VARIANTS = {v.name for m in methods.in_pipeline(CFG) for v in m.latency_variants()}
STAGES = ["validate", "prepare", "pretrain", *[f"convert@{m}" for m in METHODS], *[f"control@{c}" for c in CFG.controls],
          *[f"search@{m}" for m in SEARCHED], *[f"transfer@{m}" for m in TRANSFERRED], "latency", "report"]
N_TRIALS = 3
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@localhost"}


def _sh(args, cwd, env, timeout=900):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory, request):
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend store (a role and database of the test module's
    own: modules run serially share the PostgreSQL server) and served artifacts."""
    name = "mlflow_" + request.module.__name__.rsplit(".", 1)[-1]
    postgres.add_role(name, "mlflow-pw", name)
    port, folder = _free_port(), tmp_path_factory.mktemp("mlflow-server")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.url(name, "mlflow-pw", name),
         "--host", "127.0.0.1", "--port", str(port), "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    wait_until_healthy(uri, server, folder / "server.log")
    yield uri
    server.terminate()
    server.wait(timeout=30)


def wait_until_healthy(uri: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait for an `mlflow server` process to answer on /health; its log's tail if it dies or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return
        except OSError:
            assert server.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
    raise RuntimeError("mlflow server did not come up: " + log.read_text()[-3000:])


def copy_project(root: Path, tracking_server: str, overlay=None) -> tuple[Path, dict]:
    """A committed copy of the repository (tracked and non-ignored files) at ``root`` with a tiny profile,
    then ``overlay(params)`` if given; and the environment its commands run in."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    params = tiny_profile(yaml.safe_load((root / "params.yaml").read_text()))
    if overlay is not None:
        overlay(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=tracking_server)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "e2e"]):
        _sh(cmd, root, env)
    return root, env


@pytest.fixture(scope="module")
def project(tmp_path_factory, tracking_server):
    """A committed copy of the repository (tracked and non-ignored files) with a tiny profile."""
    return copy_project(tmp_path_factory.mktemp("e2e") / "project", tracking_server)


def tiny_profile(params: dict) -> dict:
    """params.yaml shrunk so that every stage runs in seconds, on one thread (two pytest workers share
    two cores)."""
    params["data"]["upstream"]["renders"] = {"train": 1, "val": 1, "test": 1}
    params["data"]["downstream"]["max_train"] = 200
    params["model"].update(depth=8, width=0.5)
    params["pretrain"].update(epochs=5, batch_size=16, threads=1)
    for method in METHODS:
        params["convert"][method]["train"]["epochs"] = 1
        if "temperature" in params["convert"][method]:
            params["convert"][method]["temperature"]["epochs"] = 0
    for method in SEARCHED:
        params["search"][method].update(n_trials=N_TRIALS, steps=2, final_steps=2)
        params["search"][method]["sampler"]["n_startup_trials"] = 2
    params["transfer"]["train"]["epochs"] = 1
    params["latency"].update(batch_size=4, threads=[1], warmup=1, iterations=30, sessions=2)
    params["report"]["samples_per_dataset"] = 8
    params["tracking"]["system_metrics_interval"] = 1  # the tiny stages run for seconds
    _one_thread(params)
    return params


def _runs(env: dict, experiment: str = "dynconv-ablation"):
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=[experiment], output_format="pandas")


def _one_thread(node) -> None:
    """Every ``threads: 0`` (all cores) of a params tree becomes 1."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "threads" and value == 0:
                node[key] = 1
            else:
                _one_thread(value)
