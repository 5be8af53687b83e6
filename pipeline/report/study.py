"""The study report: many pipeline executions (training seeds, ablation grids) aggregated from MLflow.

A study is every stage run whose params carry ``tracking.study = <name>``. Runs
are grouped into pipeline executions (tag ``pipeline_id``: one DVC experiment
each); executions that differ only in ``train_seed`` are one *setting* seen
with several seeds. The report gives, per setting:

- the verdict table (:mod:`pipeline.report.verdicts`) with the 95 % CI of every
  claim's paired effect over the seeds;
- per stage and metric the mean, standard deviation, 95 % CI and n;
- for every param that differs between settings (whatever it is), one table
  and one figure: the metrics of the stages that param feeds, mean +- CI per
  value, with the number of seeds.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.claims import RunMetrics, confidence_interval
from pipeline.config import Config, parse_config
from pipeline.errors import DataError
from pipeline.paths import REPORTS
from pipeline.report import figures
from pipeline.report.document import Figure, Section, Table, Text, to_html, to_markdown
from pipeline.report.verdicts import INTRO, verdict_rows
from pipeline.tracking import quiet_logs, run_url, tracking_uri

SEED = "train_seed"
IGNORED = ("tracking.",)  # params that name the study, not the experiment
METRICS = ("test_acc", "val_acc", "macs_per_image", "nonzero_params", "executed_fraction", "kernel_sparsity",
           "mac_ratio")


@dataclass
class Execution:
    """One pipeline execution of the study (one DVC experiment): its params and its stages' final metrics."""

    pipeline_id: str
    params: dict[str, str]
    metrics: RunMetrics = field(default_factory=dict)
    runs: dict[str, tuple[str, str]] = field(default_factory=dict)  # stage -> (experiment id, run id)

    @property
    def seed(self) -> str:
        return self.params.get(SEED, "")


@dataclass
class Setting:
    """Executions that differ only in the training seed."""

    varied: dict[str, str]  # the values of the params that differ between settings
    executions: list[Execution]

    @property
    def seeds(self) -> list[str]:
        return sorted((e.seed for e in self.executions), key=lambda s: (len(s), s))

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.varied.items()) or "all runs"


def load(study: str, experiment: str) -> list[Execution]:
    """The study's executions from MLflow, complete stage runs only."""
    quiet_logs()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string=f"params.`tracking.study` = '{study}' and tags.kind = 'stage' "
                                            "and attributes.status = 'FINISHED'")
    if not runs:
        raise DataError(f"no finished stage run of study '{study}' in experiment '{experiment}' of the MLflow store")
    executions: dict[str, Execution] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        pid, stage = run.data.tags["pipeline_id"], run.data.tags["stage"]
        ex = executions.setdefault(pid, Execution(pid, dict(run.data.params)))
        ex.metrics[stage] = {k.removeprefix("final."): v for k, v in run.data.metrics.items() if k.startswith("final.")}
        ex.runs[stage] = (run.info.experiment_id, run.info.run_id)
    return list(executions.values())


def settings(executions: list[Execution]) -> list[Setting]:
    """Executions grouped by the params that differ between them (the training seed aside)."""
    keys = sorted({k for e in executions for k in e.params})
    varied = [k for k in keys if k != SEED and not k.startswith(IGNORED)
              and len({e.params.get(k) for e in executions}) > 1]
    groups: dict[tuple, list[Execution]] = defaultdict(list)
    for e in executions:
        groups[tuple(e.params.get(k) for k in varied)].append(e)
    out = [Setting(dict(zip(varied, values)), sorted(group, key=lambda e: e.seed)) for values, group in groups.items()]
    return sorted(out, key=lambda s: [_sortable(v) for v in s.varied.values()])


def _sortable(value: str):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def stages_fed_by(param: str, stages: list[str]) -> list[str]:
    """The stages whose results a param feeds: its group's stage(s) (``convert.<m>`` -> ``convert@<m>`` and its
    controls' runs), else every training stage."""
    parts = param.split(".")
    if parts[0] in ("convert", "search", "transfer") and len(parts) > 1:
        fed = [s for s in stages if s == f"{parts[0]}@{parts[1]}"]
        if parts[0] == "convert":
            fed += [s for s in stages if s.startswith("control@")]
        if fed:
            return fed
    if parts[0] == "pretrain":
        return [s for s in stages if s == "pretrain"]
    return [s for s in stages if s.split("@")[0] in ("pretrain", "convert", "control")]


def summary(setting: Setting) -> pd.DataFrame:
    """Per stage and metric: mean, sd, 95 % CI, n."""
    rows = []
    stages = sorted({s for e in setting.executions for s in e.metrics}, key=_stage_order)
    for stage in stages:
        for name in METRICS:
            values = [e.metrics[stage][name] for e in setting.executions
                      if stage in e.metrics and name in e.metrics[stage] and not math.isnan(e.metrics[stage][name])]
            if not values:
                continue
            mean, low, high = confidence_interval(values)
            sd = float(pd.Series(values).std()) if len(values) > 1 else math.nan
            rows.append({"stage": stage, "metric": name, "mean": mean, "sd": sd, "CI low": low, "CI high": high,
                         "n": len(values)})
    return pd.DataFrame(rows)


def _stage_order(stage: str) -> tuple:
    order = ("prepare", "pretrain", "convert", "control", "search", "transfer", "latency", "report")
    head = stage.split("@")[0]
    return (order.index(head) if head in order else len(order), stage)


def ablation(param: str, group: list[Setting], metric: str = "test_acc") -> pd.DataFrame:
    """One row per value of ``param``: the metric of every stage it feeds, mean +- 95 % CI, and the seeds."""
    stages = sorted({s for st in group for e in st.executions for s in e.metrics}, key=_stage_order)
    fed = stages_fed_by(param, stages)
    rows = []
    for st in group:
        row = {param: st.varied[param], **{k: v for k, v in st.varied.items() if k != param}, "seeds": len(st.executions)}
        for stage in fed:
            values = [e.metrics[stage][metric] for e in st.executions if metric in e.metrics.get(stage, {})]
            if values:
                mean, low, high = confidence_interval(values)
                row[f"{stage} {metric}"] = mean
                row[f"{stage} CI low"], row[f"{stage} CI high"] = (low, high) if len(values) > 1 else (math.nan, math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def build_study_report(study: str, cfg: Config, out: Path = REPORTS) -> dict[str, Path]:
    """reports/study.md and reports/study.html (figures in reports/study_figures/) for study ``study``."""
    executions = load(study, cfg.tracking.experiment)
    groups = settings(executions)
    figs = out / "study_figures"
    if figs.exists():
        shutil.rmtree(figs)
    figs.mkdir(parents=True)
    sections = [_lead(study, groups)]
    for st in groups:
        setting_cfg = _config_of(st, cfg)
        links = {stage: f"[{rid[:8]}]({run_url(eid, rid)})" for stage, (eid, rid) in st.executions[0].runs.items()}
        table = verdict_rows(setting_cfg, [e.metrics for e in st.executions], lambda s: links.get(s, ""))
        title = f"Verdicts: {st.label()}" if st.varied else "Verdicts"
        sections.append(Section(title, [
            Text(f"{INTRO} Seeds: {', '.join(st.seeds)} (n = {len(st.executions)}); params as in the first run "
                 f"of the setting ({links.get('pretrain', '')})."),
            Table(table, f"The papers' claims judged on {len(st.executions)} training seed(s)."),
        ]))
    for st in groups:
        sections.append(Section(f"Metrics over seeds: {st.label()}", [
            Table(summary(st), "Mean, standard deviation and 95 % CI (Student's t) over the training seeds.",
                  "{:.4f}", {"n": "{:.0f}"}),
        ]))
    varied = list(groups[0].varied) if groups else []
    for param in varied:
        table = ablation(param, groups)
        fig = figures.ablation(table, param, figs / f"ablation_{param.replace('.', '_')}.png")
        sections.append(Section(f"Ablation: {param}", [
            Table(table, f"Test accuracy of the stages {param} feeds, mean over seeds (95 % CI).", "{:.4f}",
                  {"seeds": "{:.0f}"}),
            Figure(fig, f"Test accuracy against {param} (mean, 95 % CI over seeds)."),
        ]))
    md, page = out / "study.md", out / "study.html"
    title = f"Study {study}"
    md.write_text(to_markdown(title, sections, out.resolve()))
    page.write_text(to_html(title, sections, out.resolve()))
    return {"markdown": md, "html": page, "figures": figs}


def _lead(study: str, groups: list[Setting]) -> Section:
    rows = [{"setting": st.label(), "seeds": ", ".join(st.seeds), "n": len(st.executions),
             "stages": len({s for e in st.executions for s in e.metrics})} for st in groups]
    text = (f"Study `{study}`: {sum(len(s.executions) for s in groups)} pipeline executions from the MLflow store "
            f"(stage runs with `tracking.study = {study}`), in {len(groups)} setting(s) that differ in "
            f"{', '.join(f'`{k}`' for k in groups[0].varied) if groups and groups[0].varied else 'the training seed only'}.")
    return Section("Study", [Text(text), Table(pd.DataFrame(rows), "Settings and their training seeds.",
                                                formats={"n": "{:.0f}", "stages": "{:.0f}"})])


def _config_of(setting: Setting, cfg: Config) -> Config:
    """The params of a setting's executions (the first one's logged params), as a Config: claims and their
    bounds are judged as that run was configured."""
    flat = setting.executions[0].params
    nested: dict = {}
    for key, raw in flat.items():
        node = nested
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = _value(raw)
    try:
        return parse_config(nested, "the study's MLflow params")
    except Exception:  # noqa: BLE001 - runs from other code versions: judge with today's params
        return cfg


def _value(raw: str):
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return {"None": None, "True": True, "False": False}.get(raw, raw)
