"""The study report: many pipeline executions (training seeds, ablation grids) aggregated from MLflow.

A study is every stage run whose params carry ``tracking.study = <name>``. Runs
are grouped into pipeline executions (tag ``pipeline_id``: one DVC experiment
each); executions that differ only in their seed (``train_seed``, and
``data.seed`` when the study varies it: ``tracking.vary_data_seed``) are one
*setting* seen with several seeds. A study pools only one code version: every
run must carry the same git commit and no uncommitted changes to the code
(:func:`integrity`), and a setting holds each seed once. The report gives, per
setting:

- the verdict table (:mod:`pipeline.report.verdicts`): every claim's paired
  effect per seed, mean and 95 % interval over the seeds, raw and Holm-adjusted
  p-values (sequential studies: repeated p-values at the boundaries of the
  looks, listed with the seeds of each look), the verdict and, if
  inconclusive, the seeds it would need;
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

from pipeline import methods, stats
from pipeline.atomic import write_text
from pipeline.claims import RunMetrics, Sequential, confidence_interval
from pipeline.config import Config, parse_config
from pipeline.errors import DataError
from pipeline.paths import REPORTS
from pipeline.report import figures
from pipeline.report.document import Figure, Section, Table, Text, to_html, to_markdown
from pipeline.report.verdicts import INTRO, judge_all, rules_table, verdict_rows
from pipeline.tracking import quiet_logs, run_url, runs_table_url, tracking_uri

SEED = "train_seed"
DATA_SEED = "data.seed"
IGNORED = ("tracking.",)  # params that name the study, not the experiment
METRICS = ("test_acc", "val_acc", "macs_per_image", "nonzero_params", "mac_ratio")


def summary_metrics() -> tuple[str, ...]:
    """The metrics a study summarises: :data:`METRICS`, then every method's report columns."""
    own = (metric for m in methods.registry().values() for metric in m.columns.values())
    return tuple(dict.fromkeys((*METRICS, *own)))


@dataclass
class Execution:
    """One pipeline execution of the study (one DVC experiment): its params and its stages' final metrics."""

    pipeline_id: str
    params: dict[str, str]
    metrics: RunMetrics = field(default_factory=dict)
    runs: dict[str, tuple[str, str]] = field(default_factory=dict)  # stage -> (experiment id, run id)
    commit: str = ""
    dirty: str = ""

    @property
    def varies_data(self) -> bool:
        return self.params.get("tracking.vary_data_seed") == "True"

    @property
    def seed(self) -> str:
        s = self.params.get(SEED, "")
        return f"{s}/{self.params.get(DATA_SEED, '')}" if self.varies_data else s


@dataclass
class Setting:
    """Executions that differ only in the training seed."""

    varied: dict[str, str]  # the values of the params that differ between settings
    executions: list[Execution]

    @property
    def seeds(self) -> list[str]:
        return [e.seed for e in self.executions]

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
        ex = executions.setdefault(pid, Execution(pid, dict(run.data.params), commit=run.data.tags.get("git_commit", ""),
                                                  dirty=run.data.tags.get("git_dirty", "")))
        ex.metrics[stage] = {k.removeprefix("final."): v for k, v in run.data.metrics.items() if k.startswith("final.")}
        ex.runs[stage] = (run.info.experiment_id, run.info.run_id)
    return list(executions.values())


def integrity(study: str, executions: list[Execution]) -> None:
    """A study pools one code version: one git commit, no uncommitted code changes (DataError otherwise)."""
    by_commit: dict[str, list[Execution]] = defaultdict(list)
    for e in executions:
        by_commit[e.commit].append(e)
    if len(by_commit) > 1:
        (a, ea), (b, eb) = sorted(by_commit.items(), key=lambda kv: min(x.pipeline_id for x in kv[1]))[:2]
        raise DataError(f"study '{study}' holds runs of two code versions: commit {a[:10]} ({len(ea)} executions, "
                        f"e.g. pipeline {ea[0].pipeline_id}) and commit {b[:10]} ({len(eb)}, e.g. pipeline "
                        f"{eb[0].pipeline_id}); a study never pools them: run it under a new name")
    dirty = [e for e in executions if e.dirty != "false"]
    if dirty:
        raise DataError(f"study '{study}': pipeline {dirty[0].pipeline_id} ran with uncommitted code changes "
                        f"(git_dirty = {dirty[0].dirty}); commit them and run the study under a new name")


def settings(executions: list[Execution]) -> list[Setting]:
    """Executions grouped by the params that differ between them (the seeds aside); each seed once per
    setting (DataError naming both pipeline executions otherwise), seeds in numeric order."""
    keys = sorted({k for e in executions for k in e.params})
    seeds = {SEED} | ({DATA_SEED} if executions and all(e.varies_data for e in executions) else set())
    varied = [k for k in keys if k not in seeds and not k.startswith(IGNORED)
              and len({e.params.get(k) for e in executions}) > 1]
    groups: dict[tuple, list[Execution]] = defaultdict(list)
    for e in executions:
        groups[tuple(e.params.get(k) for k in varied)].append(e)
    out = []
    for values, group in groups.items():
        group = sorted(group, key=lambda e: [_sortable(x) for x in e.seed.split("/")])
        for x, y in zip(group, group[1:]):
            if x.seed == y.seed:
                raise DataError(f"seed {x.seed} appears twice in one setting: pipeline executions {x.pipeline_id} "
                                f"(run {x.runs.get('pretrain', ('', '?'))[1][:8]}) and {y.pipeline_id} "
                                f"(run {y.runs.get('pretrain', ('', '?'))[1][:8]})")
        out.append(Setting(dict(zip(varied, values)), group))
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
        for name in summary_metrics():
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


def judge_setting(st: Setting, cfg: Config, plan: Sequential | None = None):
    """The setting's verdicts (one Holm family), on its seeds in order; with a plan, at its looks."""
    return judge_all(cfg, [e.metrics for e in st.executions], st.seeds, sequential=plan)


def looks_table(st: Setting, cfg: Config, plan: Sequential) -> pd.DataFrame:
    """One row per claim: its verdict at every look the setting reached, and the seeds it needed."""
    done = [n for n in plan.looks if n <= len(st.executions)]
    rows: dict[str, dict] = {}
    for n in done:
        sub = Setting(st.varied, st.executions[:n])
        for j in judge_setting(sub, cfg, plan):
            row = rows.setdefault(j.claim.id, {"claim": j.claim.id, "seeds needed": ""})
            row[f"look {done.index(n) + 1} (n = {n})"] = j.verdict
            if j.verdict in ("reproduced", "not reproduced") and not row["seeds needed"]:
                row["seeds needed"] = str(n)
    for row in rows.values():
        if not row["seeds needed"]:
            row["seeds needed"] = "unresolved"
    return pd.DataFrame(list(rows.values()))


def boundary_rows(plan: Sequential, alpha: float, family: int) -> pd.DataFrame:
    """The t boundaries of the planned looks at Holm's first-step level alpha / family and at alpha."""
    first = stats.t_boundaries(alpha / family, plan.looks, plan.spending)
    full = stats.t_boundaries(alpha, plan.looks, plan.spending)
    return pd.DataFrame([{"look": k + 1, "seeds": n, "information fraction": n / plan.looks[-1],
                          f"alpha spent (of {alpha:g})": stats.spent(alpha, n / plan.looks[-1], plan.spending),
                          f"t boundary at alpha / {family}": first[k], "t boundary at alpha": full[k]}
                         for k, n in enumerate(plan.looks)])


def per_seed(values: tuple[float, ...], scale: float) -> str:
    return ", ".join(f"{v * scale:.4g}" for v in values)


def build_study_report(study: str, cfg: Config, out: Path = REPORTS, plan: Sequential | None = None) -> dict[str, Path]:
    """reports/study.md and reports/study.html (figures in reports/study_figures/) for study ``study``;
    ``plan``: the looks of a sequential study."""
    executions = load(study, cfg.tracking.experiment)
    integrity(study, executions)
    groups = settings(executions)
    figs = out / "study_figures"
    if figs.exists():
        shutil.rmtree(figs)
    figs.mkdir(parents=True)
    sections = [_lead(study, groups, executions[0].commit if executions else "")]
    for st in groups:
        setting_cfg = _config_of(st, cfg)

        def links(stage: str, st=st) -> str:
            seeds = [f"[{e.seed}]({run_url(*e.runs[stage])})" for e in st.executions if stage in e.runs]
            table = next((f" ([runs table]({runs_table_url(e.runs[stage][0])}))" for e in st.executions
                          if stage in e.runs), "")
            return " ".join(seeds) + table

        judgements = judge_setting(st, setting_cfg, plan)
        table = verdict_rows(setting_cfg, judgements, links)
        table.insert(table.columns.get_loc("measured"), "per seed",
                     [per_seed(j.values, j.claim.scale) for j in judgements])
        title = f"Verdicts: {st.label()}" if st.varied else "Verdicts"
        v = setting_cfg.verdicts
        how = (f" Sequential: looks after {', '.join(map(str, plan.looks))} seeds, {plan.spending.replace('_', '-')} "
               "alpha spending (Lan & DeMets 1983); p-values are repeated p-values over the looks so far."
               if plan else "")
        blocks = [
            Text(f"{INTRO} Family-wise error rate {v.family_error_rate:g} over the {len(table)} claims (Holm).{how} "
                 f"Seeds: {', '.join(st.seeds)} (n = {len(st.executions)}); the runs column links each seed's "
                 "MLflow runs of the claim's stages. A speed-up of one seed is the geometric mean of its "
                 f"{setting_cfg.latency.sessions} timing session(s), so the interval over seeds also carries the "
                 "timing noise between sessions."),
            Table(table, f"The papers' claims judged on {len(st.executions)} seed(s)."),
        ]
        if plan:
            family = 2 * sum(1 for j in judgements if j.judged)
            blocks += [Table(boundary_rows(plan, v.family_error_rate, max(family, 1)),
                             "Planned looks and the one-sided t boundaries of the spending function (simulated "
                             "under the null; Holm tests each hypothesis between alpha / family and alpha).",
                             "{:.4g}", {"look": "{:.0f}", "seeds": "{:.0f}"}),
                       Table(looks_table(st, setting_cfg, plan), "Each claim's verdict at every look so far.")]
        blocks.append(Table(rules_table(), "How each type of claim resolves."))
        sections.append(Section(title, blocks))
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
    write_text(md, to_markdown(title, sections, out.resolve()))
    write_text(page, to_html(title, sections, out.resolve()))
    return {"markdown": md, "html": page, "figures": figs}


def _lead(study: str, groups: list[Setting], commit: str) -> Section:
    rows = [{"setting": st.label(), "seeds": ", ".join(st.seeds), "n": len(st.executions),
             "stages": len({s for e in st.executions for s in e.metrics})} for st in groups]
    text = (f"Study `{study}`: {sum(len(s.executions) for s in groups)} pipeline executions from the MLflow store "
            f"(stage runs with `tracking.study = {study}`) of commit `{commit[:10]}`, in {len(groups)} setting(s) "
            "that differ in "
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
