"""Within-run uncertainty of a single run's paired effects (:class:`pipeline.claims.WithinRun`).

- Per-image metrics (test accuracy, DynConv's executed fraction) are read from each stage's
  ``per_image.json`` and resampled by a paired bootstrap over test images: the same resampled indices
  for both sides, which must share one test set (the digest of its labels).
- Timed metrics of the latency stage come with one value per timing session (``results/latency.json``,
  ``sessions``): the interval is Student's t over the sessions, on the log scale.
- Everything else a claim reads is a property of the model (parameter counts, a budget param, the MACs of
  that do not depend on the input): exact within the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import stats
from pipeline.claims import Claim, RunMetrics, Side, WithinRun
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.metrics import PER_IMAGE
from pipeline.paths import RESULTS, stage_results

TIMED_STAGES = ("latency",)


def _per_image(side: Side, results: Path) -> tuple[np.ndarray, str] | None:
    path = stage_results(side.stage, results) / PER_IMAGE
    if not path.is_file():
        return None
    body = json.loads(path.read_text())
    values = body["values"].get(side.metric)
    if values is None:
        return None
    return np.asarray(values, dtype=float), f"{body['task']}:{body['labels_sha256']}"


def _sessions(side: Side, results: Path) -> list[float] | None:
    path = results / "latency.json"
    if not path.is_file():
        return None
    values = json.loads(path.read_text()).get("sessions", {}).get(side.metric)
    return [float(v) for v in values] if values else None


def within_run(cfg: Config, run: RunMetrics, results: Path = RESULTS) -> Callable[[Claim], WithinRun | None]:
    """For a claim: its effect's within-run uncertainty from the stage outputs under ``results`` (``run``:
    the run's final metrics, for exact sides), or None when the run holds none (a timed effect without
    sessions)."""
    v = cfg.verdicts

    def of(claim: Claim) -> WithinRun | None:
        effect = claim.effect
        sides = effect.sides
        if any(s.stage in TIMED_STAGES for s in sides):
            values = _sessions(sides[0], results) if effect.kind == "value" else None
            if values is None or len(values) < 2:
                return None
            return WithinRun("timing sessions", values=tuple(math.log(x) if claim.log_scale else x for x in values))
        vectors = [_per_image(s, results) for s in sides]
        if all(vec is None for vec in vectors):
            return WithinRun("exact")
        sets = {vec[1] for vec in vectors if vec is not None}
        if len(sets) > 1:
            raise DataError(f"claim {claim.id}: {sides[0].stage} and {sides[1].stage} were tested on different "
                            f"test sets ({', '.join(sorted(sets))}); they cannot be paired")
        reps = v.bootstrap_replicates
        if effect.kind == "value":
            return WithinRun("test images", replicates=stats.paired_bootstrap(vectors[0][0], None, "mean", reps,
                                                                              v.bootstrap_seed))
        if all(vec is not None for vec in vectors):
            return WithinRun("test images", replicates=stats.paired_bootstrap(
                vectors[0][0], vectors[1][0], effect.kind, reps, v.bootstrap_seed))
        resampled = next(vec[0] for vec in vectors if vec is not None)
        means = stats.paired_bootstrap(resampled, None, "mean", reps, v.bootstrap_seed)
        fixed = next(s for s, vec in zip(sides, vectors) if vec is None).value(run)
        if fixed is None:
            return None
        a, b = (means, fixed) if vectors[0] is not None else (fixed, means)
        return WithinRun("test images", replicates=np.asarray(a - b if effect.kind == "difference" else a / b))

    return of
