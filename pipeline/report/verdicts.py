"""The verdict table: every claim of every method in the pipeline, judged as one family on the runs given.

Shared by the report (one run: within-run intervals, "single seed") and the
seed study (one run per training seed: intervals over seeds; sequential
studies: repeated p-values over the looks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

from pipeline import methods
from pipeline.claims import RULES, Claim, Judgement, RunMetrics, Sequential, WithinRun, decide_family, measure
from pipeline.config import Config

INTRO = (
    "Each claim is a statement of the paper named in its source, stated as a typed hypothesis (non-inferiority, "
    "superiority with a smallest effect of interest, equivalence, or a bound on a ratio judged on the log "
    "scale) about a paired effect: a number computed within one pipeline execution, such as the method's test "
    "accuracy minus the dense model's or its control's. Each claim has two one-sided tests, one whose rejection "
    "makes it **reproduced** and one whose rejection makes it **not reproduced** (the rules table); neither: "
    "**inconclusive**, with the seeds that would resolve it at the observed mean and spread (80 % power by "
    "default). All claims of this page are one family: Holm's step-down over the 2m one-sided p-values keeps "
    "the chance of any false verdict at or below the family-wise error rate (`verdicts.family_error_rate`). "
    "Margins are `claims` in params.yaml; controls run the method's recipe without the ingredient under test."
)


def rules_table() -> pd.DataFrame:
    """One row per hypothesis type: what it claims, what makes it reproduced and not reproduced."""
    return pd.DataFrame([{"type": k, "claim (x: the effect)": c, "reproduced when": y, "not reproduced when": n}
                         for k, (c, y, n) in RULES.items()])


def claims_of(cfg: Config) -> list[tuple[methods.Method, Claim]]:
    return [(m, c) for m in methods.in_pipeline(cfg) for c in m.claims()]


def mismatch(claim: Claim, cfg: Config) -> str | None:
    """Why the claim's two sides are not at its operating point (None: like with like)."""
    for side in claim.effect.sides:
        point = methods.operating_point(side.stage, cfg)
        if point != claim.point:
            return (f"not comparable ({side.stage} is the {point} model, the claim compares {claim.point} models: "
                    "`transfer.use_searched`)")
    return None


def judge_all(cfg: Config, runs: Sequence[RunMetrics], labels: Sequence[str] | None = None,
              within: Callable[[Claim], WithinRun | None] | None = None,
              sequential: Sequential | None = None) -> list[Judgement]:
    """Every claim of the pipeline's methods judged on the runs, as one Holm family."""
    out = []
    for m, claim in claims_of(cfg):
        margin = cfg.claims[m.name][claim.name]
        problem = mismatch(claim, cfg)
        if problem:
            j = measure(claim, margin, [])
            j.verdict = problem
        else:
            j = measure(claim, margin, runs, labels, within(claim) if within and len(runs) == 1 else None, sequential)
        out.append(j)
    v = cfg.verdicts
    return decide_family(out, v.family_error_rate, v.power)


def _p(x: float) -> str:
    if x != x:  # nan
        return ""
    if x == 0:
        return "0"
    return f"{x:.2g}" if x >= 1e-4 else f"{x:.0e}"


def verdict_rows(cfg: Config, judgements: Sequence[Judgement],
                 link: Callable[[str], str] | None = None) -> pd.DataFrame:
    """One row per claim: claim, source, type, effect, measured, margin, against, p raw / Holm, verdict,
    seeds needed, runs."""
    ran = {c.name for c in methods.controls(cfg)}
    label = {m.name: m.label for m in methods.in_pipeline(cfg)}
    rows = []
    for j in judgements:
        claim = j.claim
        verdict = j.shown_verdict()
        if j.verdict == "not run" and claim.control and claim.control not in ran:
            verdict = f"not run (control {claim.control} off: `controls` in params.yaml)"
        raw, adj, direction = j.p
        needed = "" if j.verdict != "inconclusive" else (
            f"{j.seeds_needed}" if j.seeds_needed else "no number at this mean" if j.n >= 2 else "a seed study")
        row = {"claim": f"{label.get(claim.method, claim.method)}: {claim.statement}",
               "source": f"{claim.paper}; {claim.where}", "type": claim.hypothesis.replace("_", " "),
               "effect": claim.effect_label, "measured": j.shown(), "margin": j.shown_margin(),
               "against": claim.reference,
               "p (raw)": f"{_p(raw)} ({direction})" if raw == raw else "",
               "p (Holm)": _p(adj), "verdict": verdict, "seeds needed": needed}
        if link is not None:
            row["MLflow runs"] = " ".join(dict.fromkeys(filter(None, (link(s.stage) for s in claim.effect.sides))))
        rows.append(row)
    return pd.DataFrame(rows)
