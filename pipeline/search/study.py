"""One search from start to end: the study, its MLflow runs, the trial tables and the final model.

MLflow: one parent run per study (``kind=study``, tag ``study_name``), nested under the pipeline run that
created it, and one child run per trial (params, objectives, duration, state); extra workers log their
trials under the same study run. :func:`search` runs the study to ``n_trials`` complete trials,
:func:`final_model` fine-tunes the chosen configuration and measures it, :func:`write_tables` writes
``trials.csv`` and ``pareto.csv``.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import methods
from pipeline.atomic import replacing
from pipeline.complexity import count_macs, count_params
from pipeline.errors import UserError
from pipeline.methods.files import load_any_model
from pipeline.search.storage import (
    count_trials,
    describe_storage,
    make_sampler,
    make_storage,
    pareto_trials,
    run_worker,
    select_trial,
    storage_url,
    store_dir,
)
from pipeline.search.trials import SearchContext, finetune, objective, trial_seed
from pipeline.tracking import StageRun, client_and_experiment, find_or_create_run, start_child_run
from pipeline.train import Normalizer, evaluate, normalized

STORE_OUT = Path("optuna")
RULE = ("among the Pareto-optimal trials whose validation accuracy is within {within} of the best, "
        "the one with the fewest {cost}; ties: higher accuracy, then lower trial number")  # fmt: skip


def open_study(ctx: SearchContext, sampler_seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(storage_url(ctx.cfg.optuna.storage), ctx.method.name, ctx.cfg.optuna.heartbeat_interval,
                           ctx.cfg.optuna.grace_period, ctx.cfg.optuna.reconnect_timeout)
    directions = ["maximize"] + ["minimize"] * (len(ctx.objectives) - 1)
    study = optuna.create_study(storage=storage, study_name=f"{ctx.method.name}-{ctx.study_key[:12]}",
                                directions=directions, load_if_exists=True)  # fmt: skip
    if study.metric_names != list(ctx.objectives):  # optuna-dashboard shows these instead of "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(ctx.objectives))
    # Seeded from the trials already in the store: a resumed search does not replay the first suggestions.
    study.sampler = make_sampler(ctx.sp.sampler, sampler_seed + len(study.trials))
    return study


def lock_path(method: str) -> Path:
    return store_dir(method) / "workers.lock"


class TrialLogger:
    """One MLflow child run per trial under the study's run."""

    def __init__(self, client, exp_id: str, study_run_id: str, study_name: str, method: str,
                 objectives: tuple[str, ...]):
        self.client, self.exp_id, self.parent = client, exp_id, study_run_id
        self.tags = {"kind": "trial", "study_name": study_name, "method": method}
        self.method, self.objectives = method, objectives
        self.runs: dict[int, object] = {}

    def on_start(self, trial) -> None:
        run = start_child_run(self.client, self.exp_id, self.parent, f"{self.method} trial {trial.number}",
                              {**self.tags, "trial_number": str(trial.number)}, {})  # fmt: skip
        trial.set_user_attr("mlflow_run_id", run.run_id)
        self.runs[trial.number] = run

    def on_end(self, trial, state: str, values, seconds: float) -> None:
        from mlflow.entities import Param

        run = self.runs.pop(trial.number)
        params = [Param(k, repr(v)) for k, v in trial.params.items()]
        if params:
            self.client.log_batch(run.run_id, params=params)
        metrics = {"duration_seconds": seconds}
        if values is not None:
            metrics.update(dict(zip(self.objectives, values)))
        run.log_metrics(metrics)
        run.set_tags({"state": state})
        run.end("FINISHED" if state == "COMPLETE" else "FAILED")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in zip(self.objectives, values or []))
        print(f"search@{self.method}: trial {trial.number} {state.lower()} in {seconds:.1f}s {shown}", flush=True)


def _kill_reclaimed_runs(client, study, numbers: list[int]) -> None:
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("mlflow_run_id")
        if t.number in numbers and run_id:
            client.set_terminated(run_id, "KILLED")


def _study_run(client, exp_id: str, study, ctx: SearchContext, parent_tags: dict[str, str],
               parent_id: str | None) -> str:
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id:
        return run_id
    tags = {**parent_tags, "method": ctx.method.name,
            "storage": describe_storage(storage_url(ctx.cfg.optuna.storage), ctx.method.name)}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run_id = find_or_create_run(client, exp_id, {"kind": "study", "study_name": study.study_name},
                                f"study {study.study_name}", tags)
    study.set_user_attr("mlflow_run_id", run_id)
    return run_id


def trial_rows(study, names: tuple[str, ...]) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name}
        for i, name in enumerate(names):
            row[name] = t.values[i] if t.values else ""
        row["duration_seconds"] = t.duration.total_seconds() if t.duration else ""
        row.update({f"param.{k}": v for k, v in sorted(t.params.items())})
        row["mlflow_run_id"] = t.user_attrs.get("mlflow_run_id", "")
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def baselines(ctx: SearchContext, dense: torch.nn.Module) -> dict[str, float]:
    """Dense and converted models on the same validation images the trials are scored on."""
    norm = Normalizer(ctx.data.mean, ctx.data.std)
    out = {}
    for label, model in (("dense", dense), ("converted", load_any_model(ctx.method.model_file)[0])):
        model.eval()
        out[f"{label}_val_acc"] = evaluate(model, *ctx.data.splits["val"], norm, ctx.sp.train.eval_batch_size)["acc"]
        out[f"{label}_val_macs"] = count_macs(model, ctx.val_x)
        out[f"{label}_nonzero_params"] = float(count_params(model)["nonzero_params"])
    return out


@dataclass
class Searched:
    """A finished study: its counts before and after, the Pareto front, the chosen trial."""

    study: object
    study_run_id: str
    resumed_trials: int
    counts: dict[str, int]
    pareto: list
    chosen: object
    seconds: float


def search(ctx: SearchContext, run: StageRun) -> Searched:
    """Run (or resume) the method's study under the stage run ``run`` until ``n_trials`` trials are complete,
    and pick a configuration by the method's selection rule."""
    name, sp = ctx.method.name, ctx.sp
    study = open_study(ctx, ctx.cfg.train_seed)
    study_run_id = _study_run(run.client, run.experiment_id, study, ctx, run.tags, run.pipeline_run_id)
    run.set_tags({"method": name, "study_name": study.study_name, "study_run_id": study_run_id,
                  "storage": describe_storage(storage_url(ctx.cfg.optuna.storage), name)})
    before = count_trials(study)["complete"]
    if before:
        print(f"search@{name}: resuming study {study.study_name} with {before} complete trial(s)", flush=True)
    logger = TrialLogger(run.client, run.experiment_id, study_run_id, study.study_name, name, ctx.objectives)
    t0 = time.perf_counter()
    report = run_worker(study, objective(ctx), sp.n_trials, lock_path(name), sp.timeout,
                        logger.on_start, logger.on_end)  # fmt: skip
    _kill_reclaimed_runs(run.client, study, report.reclaimed)
    seconds = time.perf_counter() - t0
    counts = count_trials(study)
    if counts["complete"] == 0:
        raise UserError(f"search.{name}: no trial completed (stopped by {report.stopped_by}); raise timeout")
    pareto = pareto_trials(study)
    chosen = select_trial(pareto, ctx.objectives.index(ctx.method.search.select_cost), sp.select_within)
    return Searched(study, study_run_id, before, counts, pareto, chosen, seconds)


def write_tables(out: Path, s: Searched, objectives: tuple[str, ...]) -> None:
    """``trials.csv`` (every trial) and ``pareto.csv`` (the Pareto-optimal ones)."""
    rows = trial_rows(s.study, objectives)
    write_csv(out / "trials.csv", rows)
    front = {t.number for t in s.pareto}
    write_csv(out / "pareto.csv", [r for r in rows if r["number"] in front])


def final_model(ctx: SearchContext, s: Searched) -> tuple[torch.nn.Module, dict[str, float], dict, dict]:
    """The chosen configuration fine-tuned with ``final_steps`` and measured once on the test split:
    (model, final metrics, per-layer values, the dense model's record)."""
    cfg, chosen = ctx.cfg, s.chosen
    model, result = finetune(ctx, chosen.params, trial_seed(cfg.train_seed, -2), ctx.sp.final_steps,
                             desc=f"{ctx.method.name} final", test=True)
    test_x = normalized(ctx.data, "test")
    measured, layers = ctx.method.measure_all(model, test_x, ctx.method.search.final_params(ctx.p, chosen.params))
    dense, dense_record, _ = load_any_model(methods.baseline().model_file)
    final = {
        **result.final, **measured, **baselines(ctx, dense),
        "mac_ratio": measured["macs_per_image"] / count_macs(dense, test_x),
        "final_val_macs": count_macs(model, ctx.val_x),
        "chosen_trial": float(chosen.number),
        "complete_trials": float(s.counts["complete"]),
        "failed_trials": float(s.counts["fail"]),
        "pareto_trials": float(len(s.pareto)),
        "search_seconds": s.seconds,
    }  # fmt: skip
    return model, final, layers, dense_record


def best_record(ctx: SearchContext, s: Searched, final: dict[str, float], layers: dict) -> dict:
    """What ``best.json`` holds: the study, the rule, the chosen trial and the final model's numbers."""
    chosen, sp = s.chosen, ctx.sp
    return {
        "study_name": s.study.study_name,
        "storage": describe_storage(storage_url(ctx.cfg.optuna.storage), ctx.method.name),
        "rule": RULE.format(within=sp.select_within, cost=ctx.method.search.select_cost),
        "trial": chosen.number,
        "params": dict(chosen.params),
        "values": dict(zip(ctx.objectives, chosen.values)),
        "trial_run_id": chosen.user_attrs.get("mlflow_run_id", ""),
        "study_run_id": s.study_run_id,
        "final": final,
        "layers": layers,
    }


def close_study_run(run: StageRun, s: Searched, best: dict) -> None:
    """The study run's summary metrics (best value per objective, counts) and its end."""
    handle = StageRun(run.client, s.study_run_id)
    handle.log_metrics({**{f"best.{k}": v for k, v in best["values"].items()},
                        "complete_trials": s.counts["complete"], "pareto_trials": len(s.pareto)})
    handle.set_tags({"chosen_trial": s.chosen.number})
    handle.end("FINISHED")


def extra_worker(ctx: SearchContext) -> None:
    """Add trials to the stage's study from another process (same params, same store)."""
    name = ctx.method.name
    client, exp_id = client_and_experiment(ctx.cfg)
    # A worker-specific sampler seed: two workers must not replay the same suggestions.
    study = open_study(ctx, ctx.cfg.train_seed + 7919 * os.getpid())
    study_run_id = _study_run(client, exp_id, study, ctx, {}, None)
    logger = TrialLogger(client, exp_id, study_run_id, study.study_name, name, ctx.objectives)
    report = run_worker(study, objective(ctx), ctx.sp.n_trials, lock_path(name), ctx.sp.timeout,
                        logger.on_start, logger.on_end)  # fmt: skip
    _kill_reclaimed_runs(client, study, report.reclaimed)
    print(f"search@{name} worker: ran trials {report.ran}, stopped by {report.stopped_by}")
