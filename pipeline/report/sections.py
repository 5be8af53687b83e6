"""Report sections. Each builder takes the :class:`Context` and returns a
:class:`Section`, or None when the stage it describes has not run. Later
stages add a builder to :data:`SECTIONS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import methods
from pipeline.config import Config
from pipeline.data import SPLITS, TASKS, first_images, read_card
from pipeline.paths import PREPARED
from pipeline.report import figures
from pipeline.report.collect import Evidence
from pipeline.report.document import Figure, Section, Table, Text
from pipeline.report.verdicts import INTRO, judge_all, rules_table, verdict_rows
from pipeline.report.within import within_run
from pipeline.tracking import run_url, runs_table_url


@dataclass
class Context:
    cfg: Config
    evidence: Evidence
    out: Path  # the report folder
    figures: Path


def stage_order(cfg: Config) -> list[str]:
    """The pipeline's stages in the order they run."""
    return ["prepare", "pretrain", *[m.stage for m in methods.with_controls(cfg)[1:]],
            *[f"search@{m.name}" for m in methods.searched(cfg)],
            *[f"transfer@{m.name}" for m in methods.transferred(cfg)], "latency"]


def overview(ctx: Context) -> Section:
    runs = ctx.evidence.runs
    order = stage_order(ctx.cfg)
    runs = runs.loc[sorted(runs.index, key=lambda s: (order.index(s) if s in order else len(order), s))]
    rows = []
    for stage, row in runs.iterrows():
        rows.append({
            "stage": stage,
            "MLflow run": f"[{row['run_id']}]({run_url(row['experiment_id'], row['run_id'])})",
            "status": row["status"],
            "duration (s)": (row["end_time"] - row["start_time"]).total_seconds() if pd.notna(row["end_time"]) else float("nan"),
            "mean CPU (%)": ctx.evidence.cpu.get(stage, float("nan")),
            "git commit": str(row.get("tags.git_commit", ""))[:10],
            "dirty": row.get("tags.git_dirty", ""),
            "params hash": row.get("tags.params_hash", ""),
            "pipeline id": row.get("tags.pipeline_id", ""),
        })
    exps = sorted({str(v) for v in runs.get("tags.dvc_exp_name", pd.Series(dtype=str)).dropna() if v})
    text = (
        f"Experiment `{ctx.cfg.tracking.experiment}`"
        f"{', DVC experiment ' + ', '.join(f'`{e}`' for e in exps) if exps else ''}. "
        "Each stage row is the run that produced the stage's current outputs; stages that DVC did not re-run "
        "keep the run (and pipeline id) of the execution that made them. Every number below is read from the "
        "MLflow run named in its table; open them with `mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db`."
    )
    if len(runs):
        text += (f" [The experiment's runs table]({runs_table_url(runs['experiment_id'].iloc[0])}) lists every "
                 "stage run (in MLflow 3 the experiment's page opens on its GenAI overview; the runs are under "
                 "\"Training runs\", nested under their pipeline's parent run: expand it).")
    return Section("Runs", [Text(text), Table(pd.DataFrame(rows), "One MLflow run per stage execution; duration "
                                              "from the run's start and end (process start-up not included); mean CPU utilisation of the "
                                              "machine over the run (MLflow system metrics, every "
                                              f"{ctx.cfg.tracking.system_metrics_interval:g} s; 100 % = every "
                                              "core busy): a slow stage on a busy machine shows here.",
                                              formats={"duration (s)": "{:.1f}", "mean CPU (%)": "{:.0f}"})])


def data_section(ctx: Context) -> Section | None:
    if not (PREPARED / "card.json").is_file():
        return None
    card = read_card()
    rows, images = [], {}
    for name in TASKS:
        tc = card["tasks"][name]
        rows.append({
            "task": name,
            "source": tc["source"],
            "image (C,H,W)": "x".join(map(str, tc["image_shape"])),
            "classes": len(tc["classes"]),
            **{f"{s} images": tc["counts"][s] for s in SPLITS},
            **({f"{s} source digits": tc["source_digits"][s] for s in SPLITS} if "source_digits" in tc else {}),
        })
        x, y = first_images(name, "train", ctx.cfg.report.samples_per_dataset)
        images[name] = (x, y, tc["classes"])
    grid = figures.sample_grid(images, ctx.cfg.report.samples_per_dataset, ctx.figures / "samples.png")
    blocks = [
        Text(
            "Upstream: the pretraining task. Downstream: the transfer task, a shifted distribution with few "
            "labels. For the embedded cluttered digits, the 1,797 source digits are split into disjoint "
            "train/val/test pools before rendering; both tasks draw each split from the same pool, so no "
            "handwritten digit appears in two splits. Arrays and their sha256 are in `data/prepared/card.json`."
        ),
        Table(pd.DataFrame(rows), "Data card (counts are images; source digits are distinct handwritten digits)."),
        Figure(grid, "First training images of each task, with labels."),
    ]
    # One table for tasks with the same classes (the digits), else one per task; none beyond 20 classes.
    groups: dict[tuple, list[str]] = {}
    for name in TASKS:
        groups.setdefault(tuple(card["tasks"][name]["classes"]), []).append(name)
    for classes, names in groups.items():
        if len(classes) <= 20:
            per_class = pd.DataFrame({f"{name} {s}": card["tasks"][name]["counts_per_class"][s]
                                      for name in names for s in SPLITS}, index=list(classes))
            blocks.append(Table(per_class.reset_index(names="class"), "Images per class.", "{:.0f}"))
    return Section("Data", blocks)


def pretrain_section(ctx: Context) -> Section | None:
    ev = ctx.evidence
    if not ev.has("pretrain"):
        return None
    m = {k.removeprefix("metrics.final."): v for k, v in ev.runs.loc["pretrain"].items() if str(k).startswith("metrics.final.")}
    t = {k.removeprefix("metrics.timing."): v for k, v in ev.runs.loc["pretrain"].items() if str(k).startswith("metrics.timing.")}
    model = ctx.cfg.model
    table = pd.DataFrame([{
        "model": f"{model.arch} depth {model.depth} width {model.width:g}" if model.arch == "cifar_resnet" else f"{model.arch} width {model.width:g}",
        "params": int(m.get("params", float("nan"))),
        "epochs": int(m.get("epochs", 0)),
        "train acc": m.get("train_acc"),
        "val acc (last)": m.get("val_acc"),
        "val acc (best)": m.get("best_val_acc"),
        "test acc": m.get("test_acc"),
        "train time (s)": t.get("train_seconds"),
        "train images/s": t.get("train_images_per_second"),
        "threads": t.get("threads"),
        "MLflow run": ev.run_ids["pretrain"],
    }])
    formats = {"train time (s)": "{:.1f}", "train images/s": "{:.0f}", "threads": "{:.0f}"}
    blocks = [Table(table, "Dense pretraining on the upstream task; test accuracy measured once, after the last epoch.", "{:.4f}", formats)]
    if "pretrain" in ev.histories:
        blocks.append(Figure(figures.training_curves(ev.histories["pretrain"], "dense pretraining", ctx.figures / "pretrain_curves.png"),
                             "Dense pretraining: per-epoch loss and accuracy (train vs validation), from MLflow."))
    return Section("Dense pretraining", blocks)


def run_metrics(ev: Evidence) -> dict[str, dict[str, float]]:
    """stage -> final metrics of the runs behind the current outputs (one pipeline execution)."""
    return {stage: _final(ev, stage) for stage in ev.runs.index}


def link(ev: Evidence, stage: str) -> str:
    """A Markdown link to the MLflow UI page of a stage's run."""
    if not ev.has(stage):
        return ""
    row = ev.runs.loc[stage]
    return f"[{row['run_id'][:8]}]({run_url(row['experiment_id'], row['run_id'])})"


def verdicts_section(ctx: Context) -> Section | None:
    """The lead: every claim, its source, the measured effect, what it is judged against, the verdict."""
    ev = ctx.evidence
    judgements = judge_all(ctx.cfg, [run := run_metrics(ev)], within=within_run(ctx.cfg, run))
    table = verdict_rows(ctx.cfg, judgements, lambda stage: link(ev, stage))
    if not len(table):
        return None
    if len(ev.runs):  # the experiment's runs table beside each claim's run links
        runs_table = f" ([runs table]({runs_table_url(ev.runs['experiment_id'].iloc[0])}))"
        table["MLflow runs"] = [cell + runs_table if cell else cell for cell in table["MLflow runs"]]
    v = ctx.cfg.verdicts
    text = (INTRO + f" Family-wise error rate {v.family_error_rate:g} over {len(table)} claims (Holm). This report "
            "covers one pipeline execution (**single seed**): an accuracy effect's interval and p-values come "
            f"from a paired bootstrap over the test images ({v.bootstrap_replicates} replicates, the same "
            "resampled images for both models), a timed effect's from its timing sessions; a property of the "
            "model (parameter counts, MACs that do not depend on the input) is exact. None of them covers the variation "
            "between training seeds: a seed study (README, \"Seed studies and ablations\") does.")
    return Section("Verdicts", [Text(text), Table(table, "The papers' claims judged on this run."),
                                Table(rules_table(), "How each type of claim resolves (x: the paired effect, "
                                      "d: its margin from `claims`, b: a ratio's bound).")])


SECTIONS: list[Callable[[Context], Section | None]] = [verdicts_section, overview, data_section, pretrain_section]


def _final(ev: Evidence, stage: str) -> dict[str, float]:
    row = ev.runs.loc[stage]
    return {k.removeprefix("metrics.final."): v for k, v in row.items() if str(k).startswith("metrics.final.") and pd.notna(v)}


def methods_section(ctx: Context) -> Section | None:
    ev = ctx.evidence
    done = [m for m in methods.with_controls(ctx.cfg)[1:] if ev.has(m.stage)]
    if not done or not ev.has("pretrain"):
        return None
    dense = _final(ev, "pretrain")
    converted = {m.name: _final(ev, m.stage) for m in done}
    first = next(iter(converted.values()))
    columns = {col: metric for m in done for col, metric in m.columns.items()}
    rows = [{"model": methods.baseline().label, "test_acc": dense["test_acc"], "val_acc": dense["val_acc"],
             "MMACs/image": first["dense_macs_per_image"] / 1e6, "MAC ratio": 1.0, "params": dense["params"],
             "nonzero params": dense["params"], **{col: float("nan") for col in columns}, "training": "",
             "MLflow run": ev.run_ids["pretrain"]}]
    for m in done:
        f = converted[m.name]
        label = f"{m.label} (width {f['width']:g})" if not m.control_of else f"control: {m.label}"
        rows.append({"model": label, "test_acc": f["test_acc"],
                     "val_acc": f["val_acc"], "MMACs/image": f["macs_per_image"] / 1e6, "MAC ratio": f["mac_ratio"],
                     "params": f["params"], "nonzero params": f["nonzero_params"],
                     **{col: f.get(metric, float("nan")) for col, metric in columns.items()},
                     "training": m.recipe(m.params(ctx.cfg)), "MLflow run": ev.run_ids[m.stage]})
    table = pd.DataFrame(rows)
    points = table.rename(columns={"MMACs/image": "mmacs"})
    fig_macs = figures.tradeoff(points, "mmacs", "MMACs per image (mean over the test set)", "Accuracy vs compute",
                                ctx.figures / "acc_vs_macs.png")
    fig_params = figures.tradeoff(points, "nonzero params", "nonzero parameters", "Accuracy vs parameters",
                                  ctx.figures / "acc_vs_params.png")
    fmt = {"MMACs/image": "{:.2f}", "MAC ratio": "{:.3f}", "params": "{:.0f}", "nonzero params": "{:.0f}",
           **{col: "{:.3f}" for col in columns}}
    counting = "; ".join(f"{m.label}: {m.counting}" for m in done if m.counting and not m.control_of)
    blocks = [
        Text("Each method starts from the dense checkpoint and is fine-tuned by the same engine. MACs are "
             "multiply-accumulates of convolutions and linear layers (FLOPs = 2 x MACs), counted by ptflops "
             "(pytorch backend) with one hook per operator that counts itself"
             + (f" ({counting})" if counting else "") + ", averaged over the test set."),
        Table(table, "Dense model and converted models; test accuracy measured once after fine-tuning.", "{:.4f}", fmt),
        Figure(fig_macs, "Test accuracy against MACs per image."),
        Figure(fig_params, "Test accuracy against nonzero parameters."),
    ]
    for m in done:
        heat = mask_heatmaps(ctx, m)
        if heat is not None:
            blocks.append(heat)
    return Section("Dynamic and sparse models", blocks)


def mask_heatmaps(ctx: Context, method) -> Figure | None:
    """Where a method with spatial masks executed, on the first test images (its converted model)."""
    import torch

    from pipeline.methods.files import load_any_model
    from pipeline.train import Normalizer

    if not method.model_file.is_file() or not (PREPARED / "upstream" / "test_y.npy").is_file():
        return None
    model, record, _ = load_any_model(method.model_file)
    model.eval()
    x, _ = first_images("upstream", "test", min(6, ctx.cfg.report.samples_per_dataset))
    meta = record["meta"]
    with torch.no_grad():
        model(Normalizer(meta["mean"], meta["std"])(torch.from_numpy(x)))
    masks = method.spatial_masks(model)
    if masks is None:
        return None
    names = [name for name, _ in masks]
    per_image = [[mask[i, 0].numpy() for _, mask in masks] for i in range(len(x))]
    fig = figures.mask_heatmaps(x, per_image, names, ctx.figures / f"{method.name}_masks.png")
    return Figure(fig, f"{method.label}: positions where each gated module executed (white), on test images.")


SECTIONS.append(methods_section)
