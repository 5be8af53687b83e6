"""The paper's numbers beside this run's: ``reference.rows`` (filled by a paper profile, profiles/*.yaml), each
quantity read from the run behind the current outputs, with the difference."""

from __future__ import annotations

import pandas as pd

from pipeline import methods
from pipeline.report.document import Section, Table, Text
from pipeline.report.sections import SECTIONS, Context, _final, link


def _stage(cfg, model: str) -> str:
    if model == "dense":
        return "pretrain"
    return next(m.stage for m in methods.with_controls(cfg) if m.name == model)


def _value(ctx: Context, model: str, metric: str) -> float:
    ev = ctx.evidence
    stage = _stage(ctx.cfg, model)
    if not ev.has(stage):
        return float("nan")
    final = _final(ev, stage)
    if metric == "acc_vs_dense":
        dense = _final(ev, "pretrain") if ev.has("pretrain") else {}
        return float(final.get("test_acc", float("nan")) - dense.get("test_acc", float("nan")))
    if model == "dense" and metric in ("macs_per_image", "mac_ratio", "nonzero_params"):
        converted = [_final(ev, m.stage) for m in methods.with_controls(ctx.cfg)[1:] if ev.has(m.stage)]
        dense = {"macs_per_image": converted[0]["dense_macs_per_image"] if converted else float("nan"),
                 "mac_ratio": 1.0, "nonzero_params": final.get("params", float("nan"))}
        return float(dense[metric])
    return float(final.get(metric, float("nan")))


def reference_section(ctx: Context) -> Section | None:
    ref = ctx.cfg.reference
    if not ref.rows and not ref.profile:
        return None
    rows = []
    for r in ref.rows:
        here = _value(ctx, r.model, r.metric)
        rows.append({"model": r.model, "quantity": r.metric, "paper": r.value, "this run": here,
                     "this run - paper": here - r.value, "source": r.source,
                     "MLflow run": link(ctx.evidence, _stage(ctx.cfg, r.model))})
    table = pd.DataFrame(rows, columns=["model", "quantity", "paper", "this run", "this run - paper", "source",
                                        "MLflow run"])
    text = (f"Profile `{ref.profile}`. " if ref.profile else "") + (ref.setting or "")
    text += (" Accuracies (and acc_vs_dense, the model's minus the dense model's) are fractions of the test set; MACs are multiply-accumulates per image as this "
             "project counts them (executed positions for spatial masks); a missing value is a stage that has not "
             "run. The paper's figure is a single reported number: the difference carries no interval.")
    return Section("The paper's numbers beside this run's", [
        Text(text.strip()),
        Table(table, "Reported by the paper (or its official code) and measured here.", "{:.4g}"),
    ])


SECTIONS.insert(1, reference_section)
