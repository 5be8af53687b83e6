"""MLflow tracking: one helper for every stage.

- Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db``
  with ``<repo>`` the repository root (also from a ``dvc exp`` temporary
  copy, see :func:`pipeline.paths.repo_root`), so every experiment logs to
  the same place.
- One run per stage execution, nested under a parent run of the pipeline
  execution. A pipeline execution is identified by ``pipeline_id`` = hash of
  (git commit, params hash, DVC experiment name): every stage of one
  ``dvc repro`` or ``dvc exp run`` shares it, and the MLflow UI lists
  pipelines side by side with their stages nested.
- Tags: git commit, dirty flag, DVC_EXP_NAME, stage, params hash, pipeline id.
- Params and tags never carry credentials: URLs lose their user-info part
  (:mod:`pipeline.redact`).
- Runs are written through ``MlflowClient`` with explicit run ids: nothing
  depends on MLflow's thread-local active run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import distributed
from pipeline.config import Config, fingerprint, flatten, to_dict
from pipeline.paths import repo_root
from pipeline.redact import redact, redact_value

MAX_PARAM_LEN = 6000


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def quiet_logs() -> None:
    for name in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking", "mlflow.pytorch", "mlflow.models",
                 "mlflow.tracking._model_registry"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> dict[str, str]:
    """Commit of HEAD and whether tracked files differ from it (params.yaml excluded:
    ``dvc exp run -S`` rewrites it, and its content is captured by the params hash)."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)params.yaml", ":(exclude)dvc.lock")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"commit": commit, "dirty": dirty}


def params_hash(cfg: Config) -> str:
    return fingerprint(cfg)[:16]


def pipeline_id(cfg: Config, git: dict[str, str], exp_name: str) -> str:
    blob = json.dumps([git["commit"], params_hash(cfg), exp_name])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class StageRun:
    """Handle on the stage's MLflow run: log metrics (optionally per step), artifacts, tags."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id: str | None = None
        self.pipeline_run_id: str | None = None
        self.tags: dict[str, str] = {}

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(f"{prefix}{k}", float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for i in range(0, len(batch), 900):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, redact(str(v)))

    def log_dataset(self, task: str, card: dict, context: str) -> None:
        """A prepared task as the run's MLflow dataset input (the runs table's Dataset column): name, digest
        of its arrays (from the data card), source, shape, counts; ``context`` is training, evaluation, ..."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        tc = card["tasks"][task]
        digest = hashlib.sha256(json.dumps(tc["sha256"], sort_keys=True).encode()).hexdigest()[:16]
        dataset = Dataset(
            name=task, digest=digest, source_type="local",
            source=json.dumps({"uri": f"data/prepared/{task}", "description": tc["source"], "seed": card["seed"]}),
            schema=json.dumps({"image_shape": tc["image_shape"], "classes": tc["classes"]}),
            profile=json.dumps({"counts": tc["counts"]}),
        )  # fmt: skip
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_model(self, model, example, name: str) -> None:
        """The trained model logged to this run under ``name`` (what it is: ``dynet``, ``sdconv-searched``,
        ``dynet-transfer``; the experiment's Models tab lists it so) with its signature, and registered under
        the same name when the store has a model registry: a rerun adds a version, tagged with the run's git
        commit and params hash. Loading it needs this project installed (its modules define the layers)."""
        import copy

        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.models import infer_signature

        quiet_logs()  # mlflow.pytorch warns about pickled models at every save: chosen here (masks do not trace)
        model = copy.deepcopy(model).cpu().eval()
        with torch.no_grad():
            output = model(example)
        signature = infer_signature(example.numpy(), output.numpy())
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.start_run(run_id=self.run_id)  # the fluent API logs models to the active run
        provenance = {k: self.tags[k] for k in MODEL_TAGS if k in self.tags}
        common = dict(name=name, signature=signature, pip_requirements=requirements(), serialization_format="pickle",
                      tags=provenance)  # pickle: masks and plans do not trace (pt2)
        try:
            try:
                info = mlflow.pytorch.log_model(model, registered_model_name=name, await_registration_for=0, **common)
            except MlflowException:  # a store without a model registry: the logged model stays
                info = mlflow.pytorch.log_model(model, **common)
            version = getattr(info, "registered_model_version", None)
            if version is not None:
                for key, value in provenance.items():
                    self.client.set_model_version_tag(name, str(version), key, value)
        finally:
            mlflow.end_run(status="RUNNING")  # the stage's context ends the run


# Run tags a registered model version carries: which code and which params made it.
MODEL_TAGS = ("git_commit", "git_dirty", "params_hash", "stage")


# The MLflow UI opens an experiment on its GenAI traces unless it is tagged as model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def requirements() -> list[str]:
    """The pinned dependencies of this project, for logged models."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r.split(";")[0].strip() for r in requires("dynconv-ablation") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []


class NullRun(StageRun):
    """The run handle of a rank other than 0: logs nothing."""

    def __init__(self):
        super().__init__(None, "")

    def end(self, status: str = "FINISHED") -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_dataset(self, task: str, card: dict, context: str) -> None:
        pass

    def log_model(self, model, example, name: str) -> None:
        pass


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # next to the default store, not inside the working directory (a dvc exp temp copy)
        location = (repo_root() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # noqa: BLE001 - created concurrently by a parallel experiment
        return client.get_experiment_by_name(name).experiment_id


def _parent_run(client, exp_id: str, pid: str, tags: dict[str, str], exp_name: str) -> str:
    found = client.search_runs(
        [exp_id], filter_string=f"tags.pipeline_id = '{pid}' and tags.kind = 'pipeline'", max_results=1
    )
    if found:
        return found[0].info.run_id
    label = exp_name or tags["git_commit"][:8]
    run = client.create_run(
        exp_id, run_name=f"pipeline {label} {tags['params_hash'][:8]}", tags={**tags, "kind": "pipeline"}
    )
    return run.info.run_id


@contextmanager
def stage_run(stage: str, cfg: Config, extra_params: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution, nested in its pipeline's parent run.

    All params are logged flattened (``pretrain.optimizer.lr``); the run ends
    FINISHED, or FAILED if the stage raised. Under data parallelism only rank 0
    has a run; the other ranks get a handle that logs nothing.
    """
    if not distributed.is_main():
        yield NullRun()
        return
    quiet_logs()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    exp_id = _experiment_id(client, cfg.tracking.experiment)
    git = git_state()
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "mlflow.source.git.commit": git["commit"],
        "dvc_exp_name": exp_name,
        "params_hash": params_hash(cfg),
        "pipeline_id": pipeline_id(cfg, git, exp_name),
    }
    if cfg.tracking.study:
        tags["study"] = cfg.tracking.study
    parent = _parent_run(client, exp_id, tags["pipeline_id"], tags, exp_name)
    run = client.create_run(
        exp_id,
        run_name=stage,
        tags={**tags, "stage": stage, "kind": "stage", "mlflow.parentRunId": parent},
    )
    from mlflow.entities import Param

    params = flatten(to_dict(cfg))
    params.update(extra_params or {})
    params = redact_value(params)  # a URL in params (a storage) loses its credentials
    batch = [Param(k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)) for k, v in params.items()]
    batch = [Param(p.key, p.value[:MAX_PARAM_LEN]) for p in batch]
    for i in range(0, len(batch), 90):
        client.log_batch(run.info.run_id, params=batch[i : i + 90])
    handle = StageRun(client, run.info.run_id)
    handle.experiment_id, handle.pipeline_run_id, handle.tags = exp_id, parent, {**tags, "stage": stage}
    monitor = system_metrics(run.info.run_id, cfg.tracking.system_metrics_interval)
    try:
        yield handle
    except BaseException:
        if monitor is not None:
            monitor.finish()
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    if monitor is not None:
        monitor.finish()
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")


def system_metrics(run_id: str, interval: float):
    """MLflow's own system metrics monitor on the run (``system/cpu_utilization_percentage``, memory, disk,
    network; GPU where there is one), sampling every ``interval`` s in a thread of this process; None when off."""
    if interval <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                   tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def client_and_experiment(cfg: Config):
    """An ``MlflowClient`` on the project's store and the id of ``cfg.tracking.experiment``."""
    quiet_logs()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    return client, _experiment_id(client, cfg.tracking.experiment)


def find_or_create_run(client, exp_id: str, key_tags: dict[str, str], run_name: str, tags: dict[str, str]) -> str:
    """The id of the run carrying all of ``key_tags``, created (with ``tags`` as well) if there is none."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in key_tags.items())
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name=run_name, tags=redact_value({**tags, **key_tags})).info.run_id


def start_child_run(client, exp_id: str, parent_id: str, run_name: str, tags: dict[str, str],
                    params: dict[str, Any]) -> StageRun:
    """A run nested under ``parent_id`` (e.g. one Optuna trial under its study), params logged."""
    from mlflow.entities import Param

    run = client.create_run(exp_id, run_name=run_name, tags=redact_value({**tags, "mlflow.parentRunId": parent_id}))
    batch = [Param(k, redact(str(v))[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(batch), 90):
        client.log_batch(run.info.run_id, params=batch[i : i + 90])
    return StageRun(client, run.info.run_id)


def ui_base() -> str:
    """Where the MLflow UI of the store serves: the tracking server itself, or ``mlflow ui``'s default address."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run."""
    return redact(f"{ui_base()}/#/experiments/{experiment_id}/runs/{run_id}")


def runs_table_url(experiment_id: str) -> str:
    """The MLflow UI's table of the experiment's runs (where the stage runs are compared); the experiment's
    own page opens on its GenAI overview in MLflow 3."""
    return redact(f"{ui_base()}/#/experiments/{experiment_id}/runs")


def write_run_info(path: Path, run: StageRun, stage: str) -> None:
    """Record which MLflow run produced a stage's outputs (read by the report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"stage": stage, "run_id": run.run_id, "tracking_uri_kind": tracking_uri().split(":", 1)[0]}
    path.write_text(json.dumps(info, indent=2) + "\n")
