"""Study integrity on constructed MLflow runs: one code version, each seed once, incomplete seeds, and a
rerun of a study name on a new commit; one `study run` per workspace at a time."""

from __future__ import annotations

import math

import pytest

from pipeline.errors import DataError, UserError
from pipeline.report import study as study_report

from .conftest import config

EXPERIMENT = "study-test"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT)

    def add(study: str, seed: int, commit: str, stages: dict[str, dict[str, float]], dirty: str = "false",
            extra: dict | None = None) -> str:
        pid = f"{commit[:4]}-{seed}-{len(client.search_runs([exp]))}"
        for stage, metrics in stages.items():
            run = client.create_run(exp, tags={"kind": "stage", "stage": stage, "pipeline_id": pid,
                                               "git_commit": commit, "git_dirty": dirty})
            rid = run.info.run_id
            for k, v in {"tracking.study": study, "train_seed": str(seed), **(extra or {})}.items():
                client.log_param(rid, k, v)
            for k, v in metrics.items():
                client.log_metric(rid, f"final.{k}", v)
            client.set_terminated(rid, "FINISHED")
        return pid

    return add


def seed_stages(acc: float) -> dict[str, dict[str, float]]:
    return {"pretrain": {"test_acc": 0.95}, "convert@dynet": {"test_acc": acc}}


def test_runs_of_two_commits_are_never_pooled(store):
    for s in range(3):
        store("s", s, "a" * 40, seed_stages(0.94))
    store("s", 0, "b" * 40, seed_stages(0.93))
    with pytest.raises(DataError, match=r"two code versions: commit aaaaaaaaaa .* commit bbbbbbbbbb"):
        study_report.integrity("s", study_report.load("s", EXPERIMENT))


def test_a_rerun_of_a_study_name_on_a_new_commit_stops_before_running(store, monkeypatch):
    from stages import study

    for s in range(2):
        store("s", s, "a" * 40, seed_stages(0.94))
    monkeypatch.setattr(study, "git_state", lambda: {"commit": "c" * 40, "dirty": "false"})
    cfg = config().model_copy(update={"tracking": config().tracking.model_copy(update={"experiment": EXPERIMENT})})
    with pytest.raises(UserError, match="already holds runs of commit aaaaaaaaaa; this code is commit cccccccccc"):
        study.check_code_version(cfg, "s")
    assert study.check_code_version(cfg, "fresh-name") == "c" * 40
    monkeypatch.setattr(study, "git_state", lambda: {"commit": "a" * 40, "dirty": "true"})
    with pytest.raises(UserError, match="uncommitted code changes"):
        study.check_code_version(cfg, "s")


def test_uncommitted_code_is_refused(store):
    store("s", 0, "a" * 40, seed_stages(0.94), dirty="true")
    with pytest.raises(DataError, match="uncommitted code changes"):
        study_report.integrity("s", study_report.load("s", EXPERIMENT))


def test_a_duplicate_seed_names_both_executions(store):
    first = store("s", 1, "a" * 40, seed_stages(0.94))
    second = store("s", 1, "a" * 40, seed_stages(0.93))
    with pytest.raises(DataError, match=f"seed 1 appears twice in one setting: pipeline executions ({first}|{second})"):
        study_report.settings(study_report.load("s", EXPERIMENT))


def test_a_nan_or_missing_seed_makes_claims_incomplete(store):
    store("s", 0, "a" * 40, seed_stages(0.94))
    store("s", 1, "a" * 40, seed_stages(math.nan))
    store("s", 2, "a" * 40, {"pretrain": {"test_acc": 0.95}})  # convert@dynet missing
    groups = study_report.settings(study_report.load("s", EXPERIMENT))
    assert [e.seed for e in groups[0].executions] == ["0", "1", "2"]
    js = {j.claim.id: j for j in study_report.judge_setting(groups[0], config())}
    v = js["dynet.acc_vs_dense"].verdict
    assert v.startswith("incomplete (n = 1 of 3;")
    assert "seed 1: convert@dynet test_acc" in v and "seed 2: stage convert@dynet missing" in v


def test_a_data_seed_study_treats_the_data_seed_as_part_of_the_seed(store):
    for s in range(2):
        store("s", s, "a" * 40, seed_stages(0.94), extra={"data.seed": str(s), "tracking.vary_data_seed": "True"})
    groups = study_report.settings(study_report.load("s", EXPERIMENT))
    assert len(groups) == 1 and groups[0].seeds == ["0/0", "1/1"]


def test_a_second_study_run_in_the_same_workspace_stops_at_once(monkeypatch):
    """While one `study run` holds the workspace, another stops with one line naming it and its pid, before
    it touches MLflow or DVC, and leaves the first's lock as it was."""
    import os
    import subprocess
    import sys

    from pipeline.search.storage import LockBusy, file_lock
    from stages import study

    from .conftest import REPO

    holder = f"study first (pid {os.getpid()})"
    try:
        held = file_lock(study.lock_path(), wait=False, holder=holder)
        held.__enter__()
    except LockBusy:
        pytest.skip("a study is running in this workspace")
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.study", "run", "second"], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        monkeypatch.setattr(study, "client_and_experiment", lambda cfg: pytest.fail("the refused run reached MLflow"))
        with pytest.raises(UserError, match=r"^study third: study first \(pid \d+\) is running in this workspace"):
            study.main(config(), "run", "third")
        assert study.lock_path().read_text() == holder
    finally:
        held.__exit__(None, None, None)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"study: error: study second: {holder} is running in this workspace (.dvc/tmp/study.lock is locked); "
        "wait for it to end, or run this one in another clone"]
    with study.one_study_at_a_time("fourth"):  # free again once the first ends
        assert study.lock_path().read_text() == f"study fourth (pid {os.getpid()})"
