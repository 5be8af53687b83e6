"""Metrics and history files that DVC reads (`dvc metrics show`, `dvc plots show`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from pipeline.atomic import replacing, write_text


def _clean(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def write_metrics(path: Path, metrics: dict) -> None:
    write_text(path, json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n")


PER_IMAGE = "per_image.json"


def write_per_image(path: Path, task: str, labels, values: dict[str, list]) -> None:
    """Per-image values of the test split (``test_acc``: 1 where the prediction was right; method metrics
    such as DynConv's executed fraction): what a single run's verdicts bootstrap over. ``labels`` pins the
    test set (its digest is checked before two stages' vectors are paired)."""
    import hashlib

    labels = [int(v) for v in labels]
    digest = hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:16]
    body = {"task": task, "split": "test", "images": len(labels), "labels_sha256": digest,
            "values": {k: [_clean(float(v)) for v in vs] for k, vs in values.items()}}
    write_text(path, json.dumps(body) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """One row per epoch; ``epoch`` is 1-based in the file."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            out = {k: _clean(row.get(k)) for k in keys}
            out["epoch"] = int(row["epoch"]) + 1
            writer.writerow(out)
