"""Stage `search@<method>`: run or resume the method's Optuna study, pick a configuration,
fine-tune it to a final model and measure its test accuracy once.

Usage: python -m stages.search <method> [--worker]   (every method with a search.<method> group)

With --worker the process only adds trials to the study on the configured
storage (same params.yaml): start it next to a running `dvc repro` to search
with more processes.

MLflow: one parent run per study (``kind=study``, tag ``study_name``), nested
under the pipeline run that created it, and one child run per trial
(params, objectives, duration, state). Extra workers started by hand
(``python -m stages.search <method> --worker``) log their trials under the
same study run.

Outputs (``results/search/<method>/``): ``trials.csv`` (every trial),
``pareto.csv`` (the Pareto-optimal ones), ``best.json`` (the chosen trial,
the rule, the final model's numbers), ``metrics.json``, ``run.json``; the
final model ``models/search_<method>.pt``.
"""

from __future__ import annotations

import csv
import json
import os
import time
import warnings
from pathlib import Path

import torch

from pipeline import methods
from pipeline.cli import run_stage
from pipeline.complexity import count_macs, count_params
from pipeline.config import Config
from pipeline.data import read_card
from pipeline.errors import UserError
from pipeline.methods.files import load_any_model, save_method_model
from pipeline.metrics import write_metrics
from pipeline.search import (
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
from pipeline.tracking import (
    StageRun,
    client_and_experiment,
    find_or_create_run,
    stage_run,
    start_child_run,
    write_run_info,
)
from pipeline.train import Normalizer, evaluate, normalized
from pipeline.trials import SearchContext, finetune, load_context, objective, trial_seed

STORE_OUT = Path("optuna")
RULE = ("among the Pareto-optimal trials whose validation accuracy is within {within} of the best, "
        "the one with the fewest {cost}; ties: higher accuracy, then lower trial number")  # fmt: skip


def open_study(ctx: SearchContext, sampler_seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(storage_url(ctx.cfg.optuna.storage), ctx.method.name, ctx.cfg.optuna.heartbeat_interval,
                           ctx.cfg.optuna.grace_period)
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
    with open(path, "w", newline="") as f:
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


def main(cfg: Config, name: str, worker: bool = False) -> None:
    ctx = load_context(cfg, methods.get(name))
    if worker:
        return extra_worker(ctx)
    sp, objectives = ctx.sp, ctx.objectives
    out = ctx.method.search_dir
    with stage_run(f"search@{name}", cfg) as run:
        study = open_study(ctx, cfg.train_seed)
        study_run_id = _study_run(run.client, run.experiment_id, study, ctx, run.tags, run.pipeline_run_id)
        run.set_tags({"method": name, "study_name": study.study_name, "study_run_id": study_run_id,
                      "storage": describe_storage(storage_url(cfg.optuna.storage), name)})
        before = count_trials(study)
        if before["complete"]:
            print(f"search@{name}: resuming study {study.study_name} with {before['complete']} complete trial(s)")
        logger = TrialLogger(run.client, run.experiment_id, study_run_id, study.study_name, name, objectives)
        t0 = time.perf_counter()
        report = run_worker(study, objective(ctx), sp.n_trials, lock_path(name), sp.timeout,
                            logger.on_start, logger.on_end)  # fmt: skip
        _kill_reclaimed_runs(run.client, study, report.reclaimed)
        search_seconds = time.perf_counter() - t0
        counts = count_trials(study)
        if counts["complete"] == 0:
            raise UserError(f"search.{name}: no trial completed (stopped by {report.stopped_by}); raise timeout")

        pareto = pareto_trials(study)
        cost = ctx.method.search.select_cost
        chosen = select_trial(pareto, objectives.index(cost), sp.select_within)
        write_csv(out / "trials.csv", trial_rows(study, objectives))
        pareto_rows = [r for r in trial_rows(study, objectives) if r["number"] in {t.number for t in pareto}]
        write_csv(out / "pareto.csv", pareto_rows)

        model, result = finetune(ctx, chosen.params, trial_seed(cfg.train_seed, -2), sp.final_steps,
                                 desc=f"{name} final", test=True)
        test_x = normalized(ctx.data, "test")
        measured, layers = ctx.method.measure_all(model, test_x, ctx.method.search.final_params(ctx.p, chosen.params))
        dense, dense_record, _ = load_any_model(methods.baseline().model_file)
        base = baselines(ctx, dense)
        dense_test_macs = count_macs(dense, test_x)
        final = {
            **result.final, **measured, **base,
            "mac_ratio": measured["macs_per_image"] / dense_test_macs,
            "final_val_macs": count_macs(model, ctx.val_x),
            "chosen_trial": float(chosen.number),
            "complete_trials": float(counts["complete"]),
            "failed_trials": float(counts["fail"]),
            "pareto_trials": float(len(pareto)),
            "search_seconds": search_seconds,
        }
        # Wall-clock numbers stay out of the model file: same params, same bytes.
        stable = {k: v for k, v in final.items() if k != "search_seconds"}
        save_method_model(ctx.method.searched_file, model, ctx.method, ctx.p, cfg, dense_record,
                          metrics=stable, search_params=dict(chosen.params), study=study.study_name)
        best = {
            "study_name": study.study_name,
            "storage": describe_storage(storage_url(cfg.optuna.storage), name),
            "rule": RULE.format(within=sp.select_within, cost=cost),
            "trial": chosen.number,
            "params": dict(chosen.params),
            "values": dict(zip(objectives, chosen.values)),
            "trial_run_id": chosen.user_attrs.get("mlflow_run_id", ""),
            "study_run_id": study_run_id,
            "final": final,
            "layers": layers,
        }
        (out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
        # The stage's declared store folder; in a `dvc exp` temporary copy the
        # journal itself lives in the repository's folder, this file says where.
        pointer = STORE_OUT / name / "study.json"
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"study_name": study.study_name, "storage": best["storage"],
                                       "complete_trials": counts["complete"]}, indent=2) + "\n")
        write_metrics(out / "metrics.json", final)
        run.log_metrics(final, prefix="final.")
        study_metrics = {f"best.{k}": v for k, v in best["values"].items()}
        study_metrics.update(complete_trials=counts["complete"], pareto_trials=len(pareto))
        study_handle = StageRun(run.client, study_run_id)
        study_handle.log_metrics(study_metrics)
        study_handle.set_tags({"chosen_trial": chosen.number})
        study_handle.end("FINISHED")
        for f in ("trials.csv", "pareto.csv", "best.json", "metrics.json"):
            run.log_artifact(out / f)
        run.log_dataset("upstream", read_card(), "training")
        run.log_model(model, test_x[:1], f"{name}-searched")
        write_run_info(out / "run.json", run, f"search@{name}")
    print(f"search@{name}: {counts['complete']} complete trials ({counts['fail']} failed) in {search_seconds:.0f}s, "
          f"{len(pareto)} Pareto-optimal; chose trial {chosen.number} {dict(chosen.params)}; final model: "
          f"test accuracy {final['test_acc']:.4f}, {final['macs_per_image'] / 1e6:.2f} M MACs/image "
          f"({final['mac_ratio']:.3f} x dense), {final['nonzero_params']:.0f} nonzero params")


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


def main_options(parser) -> None:
    parser.add_argument("--worker", action="store_true",
                        help="only add trials to the study on the configured storage (run next to `dvc repro`)")



if __name__ == "__main__":
    run_stage("search", main, __doc__, methods=lambda: [m.name for m in methods.registry().values() if m.search],
              options=main_options)
