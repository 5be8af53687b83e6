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
- A tracking store that stops answering (a server restarted for an upgrade,
  a proxy's 5xx) is waited for, never a crash mid-stage: metrics logged during
  training are kept and sent once it answers, while training goes on; every
  other call (creating the run, params, tags, artifacts, the model, the run's
  end) is retried with backoff for up to ``tracking.retry_seconds``
  (:class:`PatientClient`), then the stage stops with one line naming the
  store and how long it waited. MLflow's own HTTP retries are off
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_TIMEOUT``, unless the environment
  sets them) so that this deadline is the one that holds. Metrics keep their
  first timestamp through retries, so a batch the store received before the
  answer was lost is not stored twice.
- A stage execution has one run, also across a failure: the run's id is kept
  in ``checkpoints/runs/<stage>.json`` until the run ends, and a rerun of the
  same pipeline (same code and params) whose run was left RUNNING (the store
  went away, the process was killed) continues that run, skipping every
  (metric, step) it already holds, instead of opening a second one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import distributed
from pipeline.atomic import FULL_DISK, write_json
from pipeline.config import Config, fingerprint, flatten, to_dict
from pipeline.errors import UserError, first_line
from pipeline.paths import CHECKPOINTS, repo_root
from pipeline.redact import redact, redact_value

MAX_PARAM_LEN = 6000


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def quiet_logs() -> None:
    for name in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking", "mlflow.pytorch", "mlflow.models",
                 "mlflow.tracking._model_registry"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # a retry line per refused request
    # MLflow's own HTTP retries (7 with exponential backoff: about 4 min per call) would hide the stage's
    # deadline (tracking.retry_seconds) and stall training at every epoch while a server is away: no
    # retry, a 30 s timeout per request; PatientClient does the waiting. Values set in the environment win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class TrackingUnavailable(UserError):
    """The MLflow tracking store did not answer within ``tracking.retry_seconds``."""


class TrackingStoreFull(UserError):
    """The MLflow store (its database or artifact folder) could not write: the disk is full."""


def _http_store(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def _unreachable(err: BaseException, uri: str) -> bool:
    """Whether an MLflow call failed because the store could not be reached or could not serve for a while
    (connection refused or reset, a timeout; an HTTP server's 429 or 5xx): worth waiting for. A request the
    store rejected (a bad param, a missing run) is not."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return True
    if isinstance(err, requests.exceptions.HTTPError):
        return err.response is not None and (err.response.status_code == 429 or err.response.status_code >= 500)
    if isinstance(err, MlflowException):
        text = str(err)
        if text.startswith("API request to") and "failed with" in text and "exception" in text:
            return True  # raised by MLflow's REST client around connection errors and timeouts
        if "database is locked" in text:
            return True
        return _http_store(uri) and err.get_http_status_code() in (429, 500, 502, 503, 504)
    return False


def _full_disk(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in FULL_DISK:
        return True
    return "disk is full" in str(err) or "No space left on device" in str(err)


class PatientClient:
    """An ``MlflowClient`` whose calls wait for an unreachable store.

    Every method of the wrapped client is retried with backoff (0.5 s doubling to 10 s) while the store does
    not answer (:func:`_unreachable`), for up to ``patience`` s from the call's first failure; then
    :class:`TrackingUnavailable` (one line: the store without credentials, how long it waited, what it was
    doing). A full disk under the store is :class:`TrackingStoreFull` at once. :meth:`try_once` makes a
    single attempt (for metrics during training, which must not stall it).
    """

    def __init__(self, client, patience: float, uri: str):
        self._client, self.patience, self.uri = client, patience, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            return self.call(name, lambda: attr(*args, **kwargs))

        return call

    def call(self, what: str, fn):
        start, delay, told = time.monotonic(), 0.5, False
        while True:
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified below; anything else is re-raised as it was
                self._raise_if_full(err)
                if not _unreachable(err, self.uri):
                    raise
                waited = time.monotonic() - start
                if waited >= self.patience:
                    raise TrackingUnavailable(
                        f"MLflow tracking store {redact(self.uri)} did not answer for {waited:.0f} s "
                        f"(tracking.retry_seconds = {self.patience:g}; last call {what}: {first_line(err)}); "
                        "the stage's outputs and checkpoint are kept: start the store again and rerun, "
                        "which continues this stage's run"
                    ) from None
                if not told:
                    print(f"MLflow tracking store {redact(self.uri)} is not answering ({what}: {first_line(err)}); "
                          f"retrying for up to {self.patience:g} s", file=sys.stderr, flush=True)
                    told = True
                time.sleep(min(delay, max(0.0, self.patience - waited)))
                delay = min(2 * delay, 10.0)

    def try_once(self, name: str, *args, **kwargs) -> bool:
        """One attempt of ``name``: True if it went through, False if the store did not answer."""
        try:
            getattr(self._client, name)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._raise_if_full(err)
            if not _unreachable(err, self.uri):
                raise
            return False
        return True

    def _raise_if_full(self, err: BaseException) -> None:
        if _full_disk(err):
            where = getattr(err, "filename", None) or redact(self.uri)
            raise TrackingStoreFull(f"MLflow store cannot write {where}: no space left on device") from None


def patient_client(cfg: Config | None = None, patience: float | None = None) -> PatientClient:
    """An :class:`PatientClient` on the project's store; ``patience`` defaults to ``tracking.retry_seconds``."""
    quiet_logs()
    from mlflow.tracking import MlflowClient

    if patience is None:
        patience = cfg.tracking.retry_seconds if cfg is not None else 0.0
    return PatientClient(MlflowClient(tracking_uri()), patience, tracking_uri())


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
    """Handle on the stage's MLflow run: log metrics (optionally per step), artifacts, tags.

    Metrics are queued and sent at once when the store answers; while it does not (one attempt every
    ``RETRY_EVERY`` s) they wait in the queue and training goes on. :meth:`flush` sends the queue, waiting
    for the store up to the client's patience; every other call waits the same way. A run continued after a
    failure skips each (metric, step) it already holds (``skip``).
    """

    RETRY_EVERY = 5.0

    def __init__(self, client: PatientClient, run_id: str, skip: set[tuple[str, int]] | None = None):
        self.client = client
        self.run_id = run_id
        self.experiment_id: str | None = None
        self.pipeline_run_id: str | None = None
        self.tags: dict[str, str] = {}
        self.skip = skip or set()
        self._pending: list = []
        self._next_try = 0.0
        self._after_success: list = []

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)

    def after_success(self, action) -> None:
        """Run ``action()`` once the stage's run has ended FINISHED (e.g. remove a resume checkpoint)."""
        self._after_success.append(action)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [
            Metric(f"{prefix}{k}", float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (f"{prefix}{k}", step or 0) not in self.skip
        ]
        if time.monotonic() >= self._next_try:
            self._send(wait=False)

    def flush(self) -> None:
        """Send every queued metric, waiting for the store (up to the client's patience)."""
        self._send(wait=True)

    def _send(self, wait: bool) -> None:
        while self._pending:
            batch = self._pending[:900]
            if wait:
                self.client.log_batch(self.run_id, metrics=batch)
            elif not self.client.try_once("log_batch", self.run_id, metrics=batch):
                if self._next_try == 0.0:
                    print(f"MLflow tracking store {redact(self.client.uri)} is not answering: metrics are kept "
                          "and sent once it does; training goes on", file=sys.stderr, flush=True)
                self._next_try = time.monotonic() + self.RETRY_EVERY
                return
            del self._pending[: len(batch)]
        self._next_try = 0.0

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.flush()
        path = Path(path)
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except TrackingStoreFull:  # name the artifact it was writing, not the store
            raise TrackingStoreFull(f"MLflow store cannot write {self._artifact_dest(path, artifact_path)}: "
                                    "no space left on device") from None

    def _artifact_dest(self, path: Path, artifact_path: str | None) -> str:
        from urllib.parse import unquote, urlparse

        root = self.client.get_run(self.run_id).info.artifact_uri
        if root.startswith("file:"):
            root = unquote(urlparse(root).path)
        return "/".join(p for p in (root.rstrip("/"), artifact_path, path.name) if p)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.flush()
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
        provenance = {k: self.tags[k] for k in MODEL_TAGS if k in self.tags}
        common = dict(name=name, signature=signature, pip_requirements=requirements(), serialization_format="pickle",
                      tags=provenance)  # pickle: masks and plans do not trace (pt2)

        def log():
            try:
                return mlflow.pytorch.log_model(model, registered_model_name=name, await_registration_for=0,
                                                **common)
            except MlflowException as err:  # a store without a model registry: the logged model stays
                if _unreachable(err, self.client.uri):
                    raise
                return mlflow.pytorch.log_model(model, **common)

        self.flush()
        mlflow.start_run(run_id=self.run_id)  # the fluent API logs models to the active run
        try:
            info = self.client.call("log_model", log)
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


def _open_run_file(stage: str) -> Path:
    """Where a stage execution keeps its run's id until the run ends (a rerun continues that run)."""
    return CHECKPOINTS / "runs" / f"{stage}.json"


def _continued_run(client, stage: str, pid: str) -> tuple[str, set[tuple[str, int]]] | None:
    """The run a failed execution of this stage left RUNNING for the same pipeline, and the (metric, step)
    pairs it holds; None when there is none."""
    path = _open_run_file(stage)
    try:
        left = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if left.get("pipeline_id") != pid or left.get("store") != redact(tracking_uri()):
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(left["run_id"])
    except MlflowException:  # deleted meanwhile
        return None
    if run.info.status != "RUNNING":
        return None
    held = {(key, m.step) for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    return run.info.run_id, held


def create_run(client: PatientClient, exp_id: str, run_name: str, tags: dict[str, str]):
    """``create_run`` that a retry cannot double: each attempt first looks for the run a lost answer created."""
    import uuid

    key = uuid.uuid4().hex
    tags = {**tags, "execution_id": key}

    def attempt():
        found = client._client.search_runs([exp_id], filter_string=f"tags.execution_id = '{key}'", max_results=1)
        return found[0] if found else client._client.create_run(exp_id, run_name=run_name, tags=tags)

    return client.call("create_run", attempt)


@contextmanager
def stage_run(stage: str, cfg: Config, extra_params: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution, nested in its pipeline's parent run.

    All params are logged flattened (``pretrain.optimizer.lr``); the run ends
    FINISHED, or FAILED if the stage raised. Under data parallelism only rank 0
    has a run; the other ranks get a handle that logs nothing. A run an earlier
    execution of the same pipeline's stage left RUNNING is continued (module
    docstring). Actions registered with :meth:`StageRun.after_success` run once
    the run has ended FINISHED.
    """
    if not distributed.is_main():
        yield NullRun()
        return
    client = patient_client(cfg)
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
    continued = _continued_run(client, stage, tags["pipeline_id"])
    if continued is not None:
        run_id, held = continued
        print(f"{stage}: continuing MLflow run {run_id} (left running by an earlier execution)", file=sys.stderr)
    else:
        run_id, held = create_run(client, exp_id, stage, {**tags, "stage": stage, "kind": "stage",
                                                          "mlflow.parentRunId": parent}).info.run_id, set()
        from mlflow.entities import Param

        params = flatten(to_dict(cfg))
        params.update(extra_params or {})
        params = redact_value(params)  # a URL in params (a storage) loses its credentials
        batch = [Param(k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)) for k, v in params.items()]
        batch = [Param(p.key, p.value[:MAX_PARAM_LEN]) for p in batch]
        for i in range(0, len(batch), 90):
            client.log_batch(run_id, params=batch[i : i + 90])
    marker = _open_run_file(stage)
    write_json(marker, {"run_id": run_id, "pipeline_id": tags["pipeline_id"], "store": redact(tracking_uri())})
    handle = StageRun(client, run_id, skip=held)
    handle.experiment_id, handle.pipeline_run_id, handle.tags = exp_id, parent, {**tags, "stage": stage}
    monitor = system_metrics(run_id, cfg.tracking.system_metrics_interval, resume=continued is not None)
    try:
        yield handle
        handle.flush()
    except BaseException as err:
        if monitor is not None:
            monitor.finish()
        if not isinstance(err, TrackingUnavailable) and client.try_once("set_terminated", run_id, "FAILED"):
            marker.unlink(missing_ok=True)  # ended: a rerun opens a new run
        raise
    if monitor is not None:
        monitor.finish()
    client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    marker.unlink(missing_ok=True)
    for action in handle._after_success:
        action()


def system_metrics(run_id: str, interval: float, resume: bool = False):
    """MLflow's own system metrics monitor on the run (``system/cpu_utilization_percentage``, memory, disk,
    network; GPU where there is one), sampling every ``interval`` s in a thread of this process; None when off.
    ``resume``: a continued run's samples go on from its last step. Samples taken while the store is away are
    dropped (they describe the machine, not the result)."""
    if interval <= 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                   resume_logging=resume, tracking_uri=tracking_uri())
    monitor.start()
    return monitor


def client_and_experiment(cfg: Config):
    """A :class:`PatientClient` on the project's store and the id of ``cfg.tracking.experiment``."""
    client = patient_client(cfg)
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

    run = create_run(client, exp_id, run_name, redact_value({**tags, "mlflow.parentRunId": parent_id}))
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
    write_json(path, {"stage": stage, "run_id": run.run_id, "tracking_uri_kind": tracking_uri().split(":", 1)[0]})
