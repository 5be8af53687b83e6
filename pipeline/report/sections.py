"""Report sections. Each builder takes the :class:`Context` and returns a
:class:`Section`, or None when the stage it describes has not run. Later
stages add a builder to :data:`SECTIONS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.data import SPLITS, TASKS, read_card
from pipeline.paths import PREPARED
from pipeline.report import figures
from pipeline.report.collect import Evidence
from pipeline.report.document import Figure, Section, Table, Text


@dataclass
class Context:
    cfg: Config
    evidence: Evidence
    out: Path  # the report folder
    figures: Path


def overview(ctx: Context) -> Section:
    runs = ctx.evidence.runs
    rows = []
    for stage, row in runs.iterrows():
        rows.append({
            "stage": stage,
            "MLflow run id": row["run_id"],
            "status": row["status"],
            "git commit": str(row.get("tags.git_commit", ""))[:10],
            "dirty": row.get("tags.git_dirty", ""),
            "params hash": row.get("tags.params_hash", ""),
        })
    first = runs.iloc[0]
    text = (
        f"Experiment `{ctx.cfg.tracking.experiment}`, pipeline id `{first.get('tags.pipeline_id', '')}`"
        f"{', DVC experiment `' + str(first['tags.dvc_exp_name']) + '`' if first.get('tags.dvc_exp_name') else ''}. "
        "Every number below is read from the MLflow run named in its table; open them with "
        "`mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db`."
    )
    return Section("Runs", [Text(text), Table(pd.DataFrame(rows), "One MLflow run per stage execution.")])


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
        x = np.load(PREPARED / name / "train_x.npy", mmap_mode="r")[: ctx.cfg.report.samples_per_dataset]
        y = np.load(PREPARED / name / "train_y.npy")[: ctx.cfg.report.samples_per_dataset]
        images[name] = (np.asarray(x), y, tc["classes"])
    grid = figures.sample_grid(images, ctx.cfg.report.samples_per_dataset, ctx.figures / "samples.png")
    per_class = pd.DataFrame(
        {f"{name} {s}": card["tasks"][name]["counts_per_class"][s] for name in TASKS for s in SPLITS},
        index=card["tasks"]["upstream"]["classes"] if len(card["tasks"]["upstream"]["classes"]) <= 20 else None,
    )
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
    if per_class.shape[0] <= 20:
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


SECTIONS: list[Callable[[Context], Section | None]] = [overview, data_section, pretrain_section]
