"""Metrics and history files that DVC reads (`dvc metrics show`, `dvc plots show`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def _clean(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def write_metrics(path: Path, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """One row per epoch; ``epoch`` is 1-based in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in history for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in history:
            out = {k: _clean(row.get(k)) for k in keys}
            out["epoch"] = int(row["epoch"]) + 1
            writer.writerow(out)
