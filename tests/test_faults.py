"""Faults of what the pipeline depends on, on a tiny copy of the project: two `dvc repro` at once, the MLflow
tracking server going away mid-stage (back in time, or for longer than `tracking.retry_seconds`), a full disk
under a stage's outputs. After each fault the stage's metrics equal an undisturbed run's. (PostgreSQL
restarts under the search: tests/test_search_faults.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from .e2e_project import _free_port, copy_project, wait_until_healthy
from .full_disk import full_disk

STAGE_TIMEOUT = 300


class Server:
    """`mlflow server` on 127.0.0.1 (SQLite backend, served artifacts) that a test stops and starts again on
    the same port and store, as an upgrade would."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--host", "127.0.0.1", "--port", str(self.port), "--artifacts-destination", str(self.folder / "art"),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True)
        wait_until_healthy(self.uri, self.proc, self.folder / "server.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


def _overlay(params: dict) -> None:
    params["pretrain"]["epochs"] = 4
    params["data"]["upstream"]["max_train"] = 400  # 25 steps an epoch: the faults need epochs, not accuracy
    params["tracking"]["system_metrics_interval"] = 0


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):
    """A tiny copy of the project with its data prepared and its dense model trained once, undisturbed, by
    `dvc repro pretrain` (while a second `dvc repro` is refused: :func:`test_second_dvc_repro_is_refused`)."""
    root, env = copy_project(tmp_path_factory.mktemp("faults") / "project", server.uri, _overlay)
    return root, env


def _stage(root: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, text: str, seen: list[str]) -> None:
    """Read the process's output until a line contains ``text``."""
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"never printed {text!r}:\n" + "".join(seen)[-3000:])


def _finish(proc: subprocess.Popen, seen: list[str]) -> str:
    out, _ = proc.communicate(timeout=STAGE_TIMEOUT)
    return "".join(seen) + out


def _metrics(root: Path) -> dict:
    return json.loads((root / "results/pretrain/metrics.json").read_text())


def _pretrain_runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("dynconv-ablation")
    return client.search_runs([exp.experiment_id], "tags.stage = 'pretrain'", order_by=["attributes.start_time ASC"])


def _history_once(uri: str, run_id: str, epochs: int) -> None:
    """Every per-epoch metric of the run at steps 0..epochs-1 exactly once, every final metric once."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert "val_acc" in run.data.metrics and "final.test_acc" in run.data.metrics
    for key in run.data.metrics:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        expected = list(range(epochs)) if not key.startswith(("final.", "timing.")) else [0]
        assert steps == expected, (key, steps)


@pytest.fixture(scope="module")
def reference(project):
    """Two `dvc repro` at once: the second stops at DVC's lock with one line, the first runs undisturbed; its
    pretrain metrics are every later fault's reference."""
    root, env = project
    first = subprocess.Popen(["dvc", "repro", "pretrain"], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    _wait_for(first, "Running stage 'pretrain'", seen)
    second = subprocess.run(["dvc", "repro", "pretrain"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    out = _finish(first, seen)
    assert first.returncode == 0, out[-3000:]
    return second, _metrics(root)


def test_second_dvc_repro_is_refused_and_the_first_is_undisturbed(project, reference, server):
    root, env = project
    second, metrics = reference
    out = second.stdout + second.stderr
    errors = [line for line in out.splitlines() if line.startswith("ERROR") or "Traceback" in line]
    assert second.returncode != 0
    # One error: the workspace's lock (between stages) or the first run's lock on a stage's files (while a stage
    # runs, DVC releases the workspace lock and holds the stage's files), naming the first `dvc repro`.
    assert len(errors) == 1 and ("Unable to acquire lock" in errors[0] or "is busy" in errors[0]), out
    if "is busy" in errors[0]:
        assert "dvc repro pretrain" in out, out
    assert metrics["test_acc"] > 0.1
    [run] = _pretrain_runs(server.uri)
    assert run.info.status == "FINISHED"
    _history_once(server.uri, run.info.run_id, 4)


def test_tracking_server_restart_mid_stage_loses_nothing(project, reference, server):
    root, env = project
    before = {r.info.run_id for r in _pretrain_runs(server.uri)}
    proc, seen = _stage(root, env, "stages.pretrain"), []
    _wait_for(proc, "pretrain epoch 1/4", seen)
    server.stop()
    _wait_for(proc, "pretrain epoch 3/4", seen)  # two epochs trained while the server was away
    server.start()
    out = _finish(proc, seen)
    assert proc.returncode == 0, out[-3000:]
    assert "is not answering" in out
    assert _metrics(root) == reference[1]
    new = [r for r in _pretrain_runs(server.uri) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    _history_once(server.uri, new[0].info.run_id, 4)
    assert not (root / "checkpoints/pretrain.pt").exists() and not (root / "checkpoints/runs/pretrain.json").exists()


def test_tracking_server_away_too_long_stops_with_one_line_and_the_rerun_continues_its_run(project, reference,
                                                                                         server):
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["retry_seconds"] = 5
    (root / "short_wait.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = {r.info.run_id for r in _pretrain_runs(server.uri)}
    proc, seen = _stage(root, env, "stages.pretrain", "--params", "short_wait.yaml"), []
    _wait_for(proc, "pretrain epoch 2/4", seen)
    server.stop()
    try:
        out = _finish(proc, seen)
    finally:
        server.start()
    errors = [line for line in out.splitlines() if "error:" in line.lower() or "Traceback" in line]
    assert proc.returncode == 2, out[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"pretrain: error: MLflow tracking store {server.uri} "), errors
    assert re.search(r"did not answer for [5-9] s .*: connection refused\)", errors[0]), errors[0]
    assert (root / "checkpoints/pretrain.pt").exists() and (root / "checkpoints/runs/pretrain.json").exists()

    rerun = subprocess.run([sys.executable, "-m", "stages.pretrain", "--params", "short_wait.yaml"], cwd=root,
                           env=env, capture_output=True, text=True, timeout=STAGE_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "continuing MLflow run" in rerun.stderr and "resuming after epoch 4" in rerun.stderr + rerun.stdout
    assert _metrics(root) == reference[1]
    new = [r for r in _pretrain_runs(server.uri) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"  # one run for the execution, across the failure
    _history_once(server.uri, new[0].info.run_id, 4)


def test_full_disk_under_the_model_stops_with_one_line_and_keeps_the_previous_model(project, reference):
    root, env = project
    models = root / "models"
    previous = (models / "dense.pt").read_bytes()
    metrics = (root / "results/pretrain/metrics.json").read_text()
    with full_disk(models, keep={"dense.pt": previous}) as mounted:
        if mounted is None:
            pytest.skip("no tmpfs can be mounted here (needs root): the full-disk test needs one")
        proc = subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=STAGE_TIMEOUT)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert lines == ["pretrain: error: cannot write models/dense.pt: no space left on device; the previous "
                         "file is unchanged"], proc.stderr[-3000:]
        assert (models / "dense.pt").read_bytes() == previous
        assert sorted(p.name for p in models.iterdir()) == ["dense.pt", "filler"]  # no temporary file left
    assert (root / "results/pretrain/metrics.json").read_text() == metrics
