"""The verdict table: every claim of every method in the pipeline, judged on the runs given.

Shared by the report (one run: every verdict says "single seed") and the seed
study (one run per training seed: 95 % CIs of the paired effects).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from pipeline import methods
from pipeline.claims import RunMetrics, judge
from pipeline.config import Config

INTRO = (
    "Each claim is a statement of the paper named in its source, judged on a paired effect: a number computed "
    "within one pipeline execution (one training seed), such as the method's test accuracy minus the dense "
    "model's or minus its control's. **reproduced**: the 95 % confidence interval of the effect over training "
    "seeds lies within the claim's bound (`claims` in params.yaml); **not reproduced**: it lies outside; "
    "**inconclusive**: it straddles the bound. With one seed the interval is the point itself and the verdict "
    "says so. Controls run the method's recipe without the ingredient under test (`controls` in params.yaml)."
)


def verdict_rows(cfg: Config, runs: list[RunMetrics], link: Callable[[str], str] | None = None) -> pd.DataFrame:
    """One row per claim: claim, source, effect, measured (CI or single seed), bound, against, verdict, run."""
    rows = []
    ran = {c.name for c in methods.controls(cfg)}
    for m in methods.in_pipeline(cfg):
        for claim in m.claims():
            j = judge(claim, runs, cfg.claims[m.name][claim.name])
            verdict = j.shown_verdict()
            if j.verdict == "not run" and claim.control and claim.control not in ran:
                verdict = f"not run (control {claim.control} off: `controls` in params.yaml)"
            row = {"claim": f"{m.label}: {claim.statement}", "source": f"{claim.paper}; {claim.where}",
                   "effect": claim.effect_label, "measured": j.shown(), "bound": j.shown_bound(),
                   "against": claim.reference, "verdict": verdict}
            if link is not None:
                row["MLflow run"] = link(m.stage)
            rows.append(row)
    return pd.DataFrame(rows)
