"""Secrets stay out of params.yaml, MLflow, reports and logs.

The end-to-end check runs the stages of a tiny pipeline (prepare, pretrain, convert@dynconv,
search@dynconv, report) against a real PostgreSQL server that asks for a password, the URL with the
password given only in ``$OPTUNA_STORAGE``, and looks for the password in every MLflow param, tag and
artifact, every output file and every line the stages printed.
"""

from __future__ import annotations

import os
import subprocess
import sys

from urllib.parse import quote

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from pipeline.redact import has_password, redact
from pipeline.search.storage import STORAGE_ENV, describe_storage, make_storage
from pipeline.errors import UserError

from .conftest import REPO, TINY, config, merge, params

pytestmark = pytest.mark.slow

PASSWORD = "Pw-7c1d@x!"  # an "@" inside, as real passwords have
FORMS = (PASSWORD, quote(PASSWORD, safe=""))  # as typed, and as it appears in a URL


@pytest.mark.parametrize("text, shown", [
    (f"postgresql://lab:{PASSWORD}@db.lab:5432/optuna", "postgresql://db.lab:5432/optuna"),
    ("mysql+pymysql://u:p@h/db in a sentence", "mysql+pymysql://h/db in a sentence"),
    ("postgresql://lab@host/db", "postgresql://host/db"),
    ("sqlite:////tmp/m.db and http://127.0.0.1:5000", "sqlite:////tmp/m.db and http://127.0.0.1:5000"),
])
def test_urls_are_shown_without_user_info(text, shown):
    assert redact(text) == shown


def test_password_detection():
    assert has_password(f"postgresql://lab:{PASSWORD}@h/db")
    assert not has_password("postgresql://lab@h/db") and not has_password("postgresql://h/db")


def test_a_password_in_params_stops_validate_with_where_to_put_it(tmp_path):
    raw = params({"optuna": {"storage": f"postgresql://lab:{PASSWORD}@127.0.0.1:5432/optuna"}})
    with pytest.raises(ConfigError) as info:
        config(raw)
    assert PASSWORD not in str(info.value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run([sys.executable, "-m", "stages.validate"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("validate: error: params.yaml: 'optuna.storage': holds a password")
    assert "PGPASSWORD" in line and "~/.pgpass" in line and STORAGE_ENV in line
    assert PASSWORD not in proc.stdout + proc.stderr
    assert config({"optuna": {"storage": "postgresql://lab@127.0.0.1:5432/optuna"}}).optuna.storage


def test_an_unreachable_store_is_one_line_without_the_password():
    with pytest.raises(UserError) as info:
        make_storage(f"postgresql://lab:{PASSWORD}@127.0.0.1:1/optuna", "dynconv")
    assert str(info.value).startswith("search storage postgresql://127.0.0.1:1/optuna cannot be opened:")
    assert PASSWORD not in str(info.value)
    assert describe_storage(f"postgresql://lab:{PASSWORD}@h:5/db", "dynconv") == "postgresql://h:5/db"


TINY_PIPELINE = merge(TINY, {
    "convert": {"dynconv": {"train": {"epochs": 1, "threads": 1}}},
    "search": {"dynconv": {"n_trials": 2, "steps": 2, "final_steps": 2,
                           "sampler": {"n_startup_trials": 1}, "train": {"threads": 1}}},
})
STAGES = [["prepare"], ["pretrain"], ["convert", "dynconv"], ["search", "dynconv"], ["report"]]


def test_no_stage_output_log_or_mlflow_record_holds_the_password(postgres, tmp_path):
    postgres.add_role("lab", PASSWORD.replace("'", "''"), "optuna")
    url = postgres.url("lab", PASSWORD, "optuna")
    work = tmp_path / "project"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params(TINY_PIPELINE), sort_keys=False))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store, STORAGE_ENV: url}
    printed = []
    for stage in STAGES:
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed.append(proc.stdout + proc.stderr)
    assert "study" in (work / "results/search/dynconv/best.json").read_text()
    # The search really used the server: its study is there.
    assert postgres.sql("SELECT count(*) FROM studies", "optuna").strip() == "1"

    def holds(blob: str | bytes) -> bool:
        return any((f if isinstance(blob, str) else f.encode()) in blob for f in FORMS)

    leaks = [f"output of {' '.join(s)}" for s, text in zip(STAGES, printed) if holds(text)]
    for path in [*work.rglob("*"), *tmp_path.glob("mlartifacts/**/*"), tmp_path / "mlflow.db"]:
        if path.is_file() and holds(path.read_bytes()):
            leaks.append(str(path.relative_to(tmp_path)))
    mlflow.set_tracking_uri(store)
    client = MlflowClient(store)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) >= len(STAGES) + 2  # stages, the pipeline parent, the study and its trials
    for run in runs:
        fields = {**run.data.params, **run.data.tags}
        leaks += [f"run {run.info.run_name}: {k}" for k, v in fields.items() if holds(v)]
        for artifact in _artifacts(client, run.info.run_id):
            local = client.download_artifacts(run.info.run_id, artifact, str(tmp_path / "dl"))
            if holds(open(local, "rb").read()):
                leaks.append(f"run {run.info.run_name}: artifact {artifact}")
    storage = [r.data.tags.get("storage") for r in runs if r.data.tags.get("storage")]
    assert storage and set(storage) == {f"postgresql://127.0.0.1:{postgres.port}/optuna"}
    assert leaks == []


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out
