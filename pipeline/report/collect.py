"""What the report is built from: the run ids the stages recorded next to their
outputs, the MLflow runs behind them (``search_runs`` into pandas), their
metric histories, and the DVC metrics files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.errors import DataError
from pipeline.paths import RESULTS
from pipeline.redact import redact
from pipeline.tracking import quiet_logs, tracking_uri


@dataclass
class Evidence:
    run_ids: dict[str, str]  # stage -> MLflow run id
    runs: pd.DataFrame  # one row per stage run, indexed by stage
    histories: dict[str, pd.DataFrame] = field(default_factory=dict)  # stage -> per-epoch metrics
    cpu: dict[str, float] = field(default_factory=dict)  # stage -> mean CPU utilisation (%), MLflow system metrics

    def has(self, stage: str) -> bool:
        return stage in self.runs.index

    def metric(self, stage: str, name: str) -> float:
        return float(self.runs.loc[stage, f"metrics.{name}"])


def read_run_ids(results: Path = RESULTS) -> dict[str, str]:
    """stage name -> run id, from every ``results/<stage>/run.json``."""
    out = {}
    for path in sorted(results.glob("**/run.json")):
        info = json.loads(path.read_text())
        if info["stage"] != "report":  # the report describes the stages, not itself
            out[info["stage"]] = info["run_id"]
    return out


def collect(experiment: str, results: Path = RESULTS) -> Evidence:
    quiet_logs()
    import mlflow
    from mlflow.tracking import MlflowClient

    run_ids = read_run_ids(results)
    if not run_ids:
        raise DataError(f"no stage outputs under '{results}': run the pipeline first (dvc repro)")
    mlflow.set_tracking_uri(tracking_uri())
    quoted = ", ".join(f"'{r}'" for r in run_ids.values())
    runs = mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"attributes.run_id IN ({quoted})", output_format="pandas"
    )
    missing = sorted(set(run_ids.values()) - set(runs.get("run_id", pd.Series(dtype=str))))
    if missing:
        raise DataError(
            f"MLflow store {redact(tracking_uri())} has no run {missing[0]} (experiment '{experiment}') recorded by the "
            "stage outputs: the outputs come from another store; rerun the pipeline with `dvc repro -f`"
        )
    stage_of = {v: k for k, v in run_ids.items()}
    runs["stage"] = runs["run_id"].map(stage_of)
    runs = runs.set_index("stage").sort_index()
    client = MlflowClient(tracking_uri())
    histories, cpu = {}, {}
    for stage, run_id in run_ids.items():
        logged = client.get_run(run_id).data.metrics
        keys = [k for k in logged if "." not in k and not k.startswith(SYSTEM)]
        rows: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                rows.setdefault(m.step, {})[key] = m.value
        if len(rows) > 1:
            histories[stage] = pd.DataFrame.from_dict(rows, orient="index").sort_index()
        if CPU in logged:
            samples = [m.value for m in client.get_metric_history(run_id, CPU)]
            cpu[stage] = sum(samples) / len(samples)
    return Evidence(run_ids, runs, histories, cpu)


SYSTEM = "system/"  # MLflow's system metrics (pipeline.tracking.system_metrics)
CPU = SYSTEM + "cpu_utilization_percentage"
