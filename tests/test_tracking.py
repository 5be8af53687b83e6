from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.paths import repo_root
from pipeline.tracking import stage_run, tracking_uri

from .conftest import config

TAGS = ("git_commit", "git_dirty", "dvc_exp_name", "stage", "params_hash", "pipeline_id")


def _runs(experiment="dynconv-ablation"):
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.search_runs(experiment_names=[experiment], output_format="pandas")


def test_stage_runs_are_nested_under_one_pipeline_run(workdir, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    cfg = config({"pretrain": {"epochs": 3}})
    with stage_run("prepare", cfg) as run:
        run.log_metrics({"upstream.train_images": 100})
    with stage_run("pretrain", cfg) as run:
        for epoch in range(3):
            run.log_metrics({"val_acc": 0.5 + epoch / 10}, step=epoch)
        (workdir / "m.json").write_text("{}")
        run.log_artifact(workdir / "m.json")
    runs = _runs()
    stages = runs[runs["tags.kind"] == "stage"]
    parents = runs[runs["tags.kind"] == "pipeline"]
    assert sorted(stages["tags.stage"]) == ["prepare", "pretrain"]
    assert len(parents) == 1
    assert set(stages["tags.mlflow.parentRunId"]) == {parents["run_id"].iloc[0]}
    for tag in TAGS:
        assert stages[f"tags.{tag}"].notna().all() and (stages[f"tags.{tag}"] != "").all(), tag
    assert set(stages["tags.dvc_exp_name"]) == {"exp-abc"}
    assert (stages["params.pretrain.epochs"] == "3").all()
    assert (stages["status"] == "FINISHED").all()
    client = MlflowClient(tracking_uri())
    pre = stages[stages["tags.stage"] == "pretrain"]["run_id"].iloc[0]
    assert [m.value for m in client.get_metric_history(pre, "val_acc")] == pytest.approx([0.5, 0.6, 0.7])
    assert [a.path for a in client.list_artifacts(pre)] == ["m.json"]


def test_other_params_make_another_pipeline_and_failures_are_recorded(workdir):
    with stage_run("prepare", config({"train_seed": 1})):
        pass
    with pytest.raises(RuntimeError):
        with stage_run("prepare", config({"train_seed": 2})):
            raise RuntimeError("boom")
    runs = _runs()
    assert (runs["tags.kind"] == "pipeline").sum() == 2
    stages = runs[runs["tags.kind"] == "stage"].set_index("params.train_seed")
    assert stages.loc["1", "status"] == "FINISHED" and stages.loc["2", "status"] == "FAILED"


def test_default_store_is_absolute_under_the_repository(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri()
    assert uri.startswith("sqlite:////") and uri.endswith("/mlflow.db")
    assert Path(uri.removeprefix("sqlite:///")).parent == repo_root()


def test_dvc_experiment_copies_map_back_to_the_repository(tmp_path):
    repo = tmp_path / "project"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    assert repo_root(copy) == repo.resolve()
    assert repo_root(repo) == repo.resolve()
