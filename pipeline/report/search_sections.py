"""Report sections of the search and transfer stages.

Trial numbers come from the MLflow child runs of each study (``kind=trial``,
``study_name`` tag), the chosen configuration and the final model from the
search stage's run, the transfer numbers from each transfer stage's run.
"""

from __future__ import annotations

import json

import pandas as pd

from pipeline import methods
from pipeline.report import figures
from pipeline.report.document import Figure, Section, Table, Text
from pipeline.report.sections import SECTIONS, Context, _final
from pipeline.tracking import quiet_logs, tracking_uri

COST_LABELS = {"macs_per_image": "MACs per image (validation)", "nonzero_params": "nonzero parameters"}


def trial_runs(experiment: str, study_name: str) -> pd.DataFrame:
    """One row per trial run of the study, from MLflow."""
    quiet_logs()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.kind = 'trial' and tags.study_name = '{study_name}'",
        output_format="pandas",
    )
    if len(runs):
        runs["trial"] = runs["tags.trial_number"].astype(int)
        runs = runs.sort_values("trial")
    return runs


def search_section(ctx: Context) -> Section | None:
    ev = ctx.evidence
    stages = [m for m in methods.searched(ctx.cfg) if ev.has(f"search@{m.name}")]
    if not stages:
        return None
    costs = "; ".join(f"{m.label}: " + ", ".join(COST_LABELS.get(c, c) for c in m.search.objectives[1:]) + " down"
                      for m in stages)
    blocks: list = [Text(
        "Multi-objective Optuna studies: every trial fine-tunes the converted model with one sampled "
        f"configuration and is scored on the validation split only (accuracy up; {costs}). The chosen trial "
        "follows the rule in the table; its configuration is then "
        "fine-tuned to the final model, whose test accuracy is measured once. Grey: every complete trial; "
        "orange: the Pareto-optimal ones; star: the chosen one; dense and converted models measured on the same "
        "validation images in the same run."
    )]
    rows = []
    for m in stages:
        method, label = m.name, m.label
        stage = f"search@{method}"
        final = _final(ev, stage)
        study = str(ev.runs.loc[stage].get("tags.study_name", ""))
        best = json.loads((m.search_dir / "best.json").read_text())
        trials = trial_runs(ctx.cfg.tracking.experiment, study)
        done = trials[trials["tags.state"] == "COMPLETE"] if len(trials) else trials
        if len(done):
            pareto_numbers = set(pd.read_csv(m.search_dir / "pareto.csv")["number"])
            costs = [(f"metrics.{c}", COST_LABELS.get(c, c)) for c in m.search.objectives[1:]]
            base = {
                "dense": {"metrics.val_acc": final["dense_val_acc"], "metrics.macs_per_image": final["dense_val_macs"],
                          "metrics.nonzero_params": final["dense_nonzero_params"]},
                "converted": {"metrics.val_acc": final["converted_val_acc"],
                              "metrics.macs_per_image": final["converted_val_macs"],
                              "metrics.nonzero_params": final["converted_nonzero_params"]},
            }
            fig = figures.pareto(done, costs, pareto_numbers, best["trial"], base,
                                 f"{label} search", ctx.figures / f"pareto_{method}.png")
            blocks.append(Figure(fig, f"{label}: validation accuracy against cost for every "
                                      f"complete trial of study `{study}`."))
        params = ", ".join(f"{k} {v:.3g}" for k, v in best["params"].items())
        rows.append({
            "method": label, "study": study,
            "complete trials": final["complete_trials"], "failed": final["failed_trials"],
            "Pareto-optimal": final["pareto_trials"], "chosen trial": final["chosen_trial"],
            "chosen params": params, "trial val_acc": best["values"]["val_acc"],
            "final val_acc": final["val_acc"], "final test_acc": final["test_acc"],
            "MAC ratio (test)": final["mac_ratio"], "nonzero params": final["nonzero_params"],
            "search (s)": final["search_seconds"],
            "MLflow stage run": ev.run_ids[stage], "MLflow study run": best["study_run_id"],
            "MLflow chosen trial run": best["trial_run_id"],
        })
        blocks.append(Text(f"{label} rule: {best['rule']}."))
    fmt = {"complete trials": "{:.0f}", "failed": "{:.0f}", "Pareto-optimal": "{:.0f}", "chosen trial": "{:.0f}",
           "MAC ratio (test)": "{:.3f}", "nonzero params": "{:.0f}", "search (s)": "{:.0f}"}
    blocks.insert(1, Table(pd.DataFrame(rows), "Searches and their chosen configurations.", "{:.4f}", fmt))
    title = " and ".join(dict.fromkeys(m.search.searches for m in stages))
    return Section(f"{title[:1].upper()}{title[1:]} search", blocks)


def transfer_section(ctx: Context) -> Section | None:
    ev = ctx.evidence
    stages = [m for m in methods.transferred(ctx.cfg) if ev.has(f"transfer@{m.name}")]
    if not stages:
        return None
    rows = []
    for method in stages:
        stage = f"transfer@{method.name}"
        m = _final(ev, stage)
        row = ev.runs.loc[stage]
        rows.append({
            "model": method.label, "source": str(row.get("tags.source", "")),
            "protocol": str(row.get("tags.protocol", "")), "upstream test_acc": m.get("upstream_test_acc"),
            "downstream val_acc": m["val_acc"], "downstream test_acc": m["test_acc"],
            "MMACs/image": m["macs_per_image"] / 1e6, "params": m["params"], "nonzero params": m["nonzero_params"],
            "MLflow run": ev.run_ids[stage],
        })
    table = pd.DataFrame(rows)
    tcfg = ctx.cfg.transfer
    notes = " ".join(filter(None, (m.transfer_note(ctx.cfg) for m in stages)))
    text = (f"Each model gets a new classifier head and is trained on the downstream task for "
            f"{tcfg.train.epochs} epochs ({tcfg.protocol}). {notes + ' ' if notes else ''}MACs are counted on the "
            "downstream test images.")
    fmt = {"MMACs/image": "{:.2f}", "params": "{:.0f}", "nonzero params": "{:.0f}"}
    return Section("Downstream transfer", [Text(text), Table(table, "Transfer to the downstream task.", "{:.4f}", fmt)])


SECTIONS.extend([search_section, transfer_section])
