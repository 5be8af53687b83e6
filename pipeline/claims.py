"""The papers' claims as typed hypotheses, judged on paired effects with a family-wise error rate.

A :class:`Claim` is one statement of a paper, with its source, judged on a
*paired effect*: a number computed within one pipeline execution, such as
"method test accuracy minus dense test accuracy" or "method MACs / dense
MACs". Its hypothesis type says what would make it reproduced and what would
make it not reproduced; its margin is ``claims.<method>.<name>`` in
params.yaml (positive; a ratio's bound is the ratio itself). Ratios are judged
on the log scale (a mean of ratios is biased and its interval can cross 0).

Each claim is two one-sided tests, each with a p-value (:data:`RULES`):
``yes`` (its rejection makes the claim *reproduced*) and ``no`` (its rejection
makes it *not reproduced*). All claims of one report form one family: Holm's
step-down (Holm 1979) over the 2m one-sided p-values holds the probability of
any false verdict at ``verdicts.family_error_rate`` whatever the dependence
between the tests. A claim neither of whose tests is rejected is
*inconclusive* and says how many seeds would resolve it at the observed mean
and spread.

Where the p-values come from:
- several seeds: the one-sided paired t test over the per-seed effects (in a
  sequential study, the repeated p-value of the group-sequential test over the
  looks so far, :func:`pipeline.stats.repeated_p`);
- one seed: the within-run uncertainty of the effect: a paired bootstrap over
  test images for per-image metrics (accuracy, executed fraction), the t test
  over timing sessions for timed metrics, none for exact properties of the
  model (parameter counts); such verdicts are labelled "single seed".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline import stats

# stage -> final metric -> value, for one pipeline execution (one training seed)
RunMetrics = dict[str, dict[str, float]]
Hypothesis = Literal["non_inferiority", "superiority", "equivalence", "ratio_at_most", "ratio_at_least"]
HYPOTHESES: tuple[str, ...] = Hypothesis.__args__  # type: ignore[attr-defined]
VERDICTS = ("reproduced", "not reproduced", "inconclusive")

# What each type tests, on the effect x (log x for ratios) with margin d (bound b for ratios). Shown in
# the README and the report.
RULES: dict[str, tuple[str, str, str]] = {
    "non_inferiority": ("x >= -d", "reject x <= -d", "reject x >= -d (worse by more than the margin)"),
    "superiority": ("x > 0 (d: smallest effect of interest)", "reject x <= 0",
                    "reject x >= d (no gain of the size that matters); if both are rejected, reproduced wins "
                    "(the sign is established) and the verdict notes the gain is below d"),
    "equivalence": ("|x| <= d", "two one-sided tests reject x <= -d and x >= d (the 1 - 2 alpha interval "
                    "inside the margins)", "reject x <= d or reject x >= -d (Bonferroni over the two)"),
    "ratio_at_most": ("ratio <= b, judged on log(ratio)", "reject log ratio >= log b", "reject log ratio <= log b"),
    "ratio_at_least": ("ratio >= b, judged on log(ratio)", "reject log ratio <= log b", "reject log ratio >= log b"),
}


@dataclass(frozen=True)
class Side:
    """One side of a paired effect: a final metric of a stage."""

    stage: str
    metric: str

    def value(self, run: RunMetrics) -> float | None:
        return metric(run, self.stage, self.metric)


@dataclass(frozen=True)
class Effect:
    """The paired effect of one run: ``a - b`` (difference), ``a / b`` (ratio) or ``a`` (value)."""

    kind: Literal["difference", "ratio", "value"]
    a: Side
    b: Side | None = None

    def __call__(self, run: RunMetrics) -> float | None:
        x = self.a.value(run)
        if self.kind == "value":
            return x
        y = self.b.value(run) if self.b else None
        if x is None or y is None:
            return None
        if self.kind == "difference":
            return x - y
        return None if y == 0 else x / y

    @property
    def sides(self) -> tuple[Side, ...]:
        return (self.a,) if self.b is None else (self.a, self.b)


def difference(a: tuple[str, str], b: tuple[str, str]) -> Effect:
    return Effect("difference", Side(*a), Side(*b))


def ratio(a: tuple[str, str], b: tuple[str, str]) -> Effect:
    return Effect("ratio", Side(*a), Side(*b))


def value(a: tuple[str, str]) -> Effect:
    return Effect("value", Side(*a))


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, its hypothesis type and its paired effect."""

    method: str  # the method module that states it
    name: str  # its margin is params claims.<method>.<name>
    paper: str  # the source
    where: str  # section / table / figure of the source (or "abstract")
    statement: str  # what the paper states, in one sentence
    effect_label: str  # what the effect is, e.g. "test accuracy, method minus dense (points)"
    hypothesis: Hypothesis
    effect: Effect
    reference: str = "dense"  # what the effect is paired against: dense, a control, another method
    scale: float = 1.0  # shown effect = effect * scale (100 for accuracy points)
    unit: str = ""
    control: str | None = None  # the control method judged against, if any
    comparable: Callable[[RunMetrics], bool] | None = None  # runs where the claim applies (e.g. the same width)
    condition: str = ""  # when it applies, in words
    point: str = "converted"  # the operating point both sides are at (converted | searched): like with like

    @property
    def id(self) -> str:
        return f"{self.method}.{self.name}"

    @property
    def log_scale(self) -> bool:
        return self.hypothesis.startswith("ratio")

    def validate_margin(self, margin: float) -> str | None:
        """What is wrong with a margin for this type (None: fine)."""
        if not math.isfinite(margin) or margin <= 0:
            kind = "a ratio bound" if self.log_scale else "a margin"
            return f"{kind} of a {self.hypothesis} claim must be positive, got {margin!r}"
        return None


@dataclass(frozen=True)
class Tests:
    """A claim's two one-sided tests on the test scale: bounds, sides and p-values."""

    p_yes: float
    p_no: float


def tests_of(hypothesis: str, sample: stats.Sample | None, margin: float,
             replicates: np.ndarray | None = None) -> Tests:
    """The raw one-sided p-values of a claim's two tests, from a sample of paired effects (t tests) or from
    bootstrap replicates of the effect (percentile p-values); both on the test scale (log for ratios)."""
    if replicates is not None:
        def p(bound: float, side: stats.Side) -> float:
            return stats.bootstrap_p(replicates, bound, side)
    elif sample is not None:
        def p(bound: float, side: stats.Side) -> float:
            return stats.one_sided_p(sample, bound, side)
    else:
        return Tests(math.nan, math.nan)
    return _combine(hypothesis, margin, p)


def _combine(hypothesis: str, margin: float, p: Callable[[float, stats.Side], float]) -> Tests:
    if hypothesis == "non_inferiority":
        return Tests(p(-margin, "greater"), p(-margin, "less"))
    if hypothesis == "superiority":
        return Tests(p(0.0, "greater"), p(margin, "less"))
    if hypothesis == "equivalence":
        return Tests(max(p(-margin, "greater"), p(margin, "less")),
                     min(1.0, 2 * min(p(margin, "greater"), p(-margin, "less"))))
    bound = math.log(margin)
    if hypothesis == "ratio_at_most":
        return Tests(p(bound, "less"), p(bound, "greater"))
    if hypothesis == "ratio_at_least":
        return Tests(p(bound, "greater"), p(bound, "less"))
    raise ValueError(f"unknown hypothesis type {hypothesis!r}")


def yes_no_bounds(hypothesis: str, margin: float) -> list[tuple[str, float, stats.Side]]:
    """The one-sided tests behind each direction, as (direction, bound, alternative side) on the test scale;
    a direction with two rows needs both (TOST) or either (its complement)."""
    if hypothesis == "non_inferiority":
        return [("yes", -margin, "greater"), ("no", -margin, "less")]
    if hypothesis == "superiority":
        return [("yes", 0.0, "greater"), ("no", margin, "less")]
    if hypothesis == "equivalence":
        return [("yes", -margin, "greater"), ("yes", margin, "less"), ("no", margin, "greater"), ("no", -margin, "less")]
    b = math.log(margin)
    return [("yes", b, "less"), ("no", b, "greater")] if hypothesis == "ratio_at_most" \
        else [("yes", b, "greater"), ("no", b, "less")]


@dataclass
class Judgement:
    claim: Claim
    margin: float
    values: tuple[float, ...]  # the per-seed effects (natural scale)
    mean: float = math.nan  # natural scale (geometric mean for ratios)
    low: float = math.nan  # 95 % interval, natural scale
    high: float = math.nan
    p_yes: float = math.nan  # raw one-sided p-values (sequential: repeated p-values)
    p_no: float = math.nan
    p_yes_adj: float = math.nan  # Holm-adjusted over the family
    p_no_adj: float = math.nan
    verdict: str = "not run"  # reproduced | not reproduced | inconclusive | not run | not comparable (...) | incomplete (...)
    note: str = ""
    interval: str = "seeds"  # seeds | test images | timing sessions | exact | none
    seeds_needed: int | None = None
    test_sd: float = math.nan  # spread of the per-seed effects on the test scale
    runs: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def single_seed(self) -> bool:
        return self.n == 1

    @property
    def judged(self) -> bool:
        return math.isfinite(self.p_yes) or math.isfinite(self.p_no)

    @property
    def p(self) -> tuple[float, float, str]:
        """(raw, adjusted, direction) of the decisive test: the one with the smaller adjusted p-value."""
        if self.p_yes_adj < self.p_no_adj or (self.p_yes_adj == self.p_no_adj and not self.p_no < self.p_yes):
            return self.p_yes, self.p_yes_adj, "reproduced"
        return self.p_no, self.p_no_adj, "not reproduced"

    def shown(self) -> str:
        """The measured effect with its interval and where the interval comes from."""
        if not self.values:
            return "not measured"
        s, u = self.claim.scale, self.claim.unit
        f = "{:.3g}" if self.claim.log_scale else "{:+.3g}"  # ratios unsigned, differences signed
        point = f"{f.format(self.mean * s)}{u}"
        if self.interval in ("exact", "none"):
            return f"{point} ({'exact' if self.interval == 'exact' else 'no interval'}; n = {self.n})"
        what = "over seeds" if self.interval == "seeds" else f"over {self.interval}"
        return f"{point} [95 % CI {f.format(self.low * s)}, {f.format(self.high * s)}; {what}] (n = {self.n})"

    def shown_verdict(self) -> str:
        v = self.verdict
        if v in VERDICTS and self.single_seed:
            v += {"test images": " (single seed; test-set interval)",
                  "timing sessions": " (single seed; timing-session interval)"}.get(self.interval, " (single seed)")
        if self.note:
            v += f"; {self.note}"
        return v

    def shown_margin(self) -> str:
        s, u, d = self.claim.scale, self.claim.unit, self.margin
        return {"non_inferiority": f">= -{d * s:g}{u}", "superiority": f"> 0 (smallest effect {d * s:g}{u})",
                "equivalence": f"within +-{d * s:g}{u}", "ratio_at_most": f"<= {d:g}{u}",
                "ratio_at_least": f">= {d:g}{u}"}[self.claim.hypothesis]


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval; one value gives the point itself."""
    return stats.t_interval(values, level)


def _to_test(claim: Claim, x: float) -> float:
    return math.log(x) if claim.log_scale else x


def _from_test(claim: Claim, x: float) -> float:
    return math.exp(x) if claim.log_scale else x


def effects(claim: Claim, runs: Sequence[RunMetrics]) -> tuple[list[RunMetrics], list[float | None]]:
    """The runs where the claim applies and the claim's effect in each (None: not measured there)."""
    applicable = [r for r in runs if claim.comparable is None or claim.comparable(r)]
    out = []
    for r in applicable:
        v = claim.effect(r)
        out.append(None if v is None or not math.isfinite(v) or (claim.log_scale and v <= 0) else v)
    return applicable, out


@dataclass(frozen=True)
class Sequential:
    """A group-sequential study: the planned looks (seeds at each, increasing; the last is the maximum) and
    the alpha-spending function (:func:`pipeline.stats.t_boundaries`). Judged at the looks its seeds reach."""

    looks: tuple[int, ...]
    spending: stats.Spending


def measure(claim: Claim, margin: float, runs: Sequence[RunMetrics], labels: Sequence[str] | None = None,
            within: WithinRun | None = None, sequential: Sequential | None = None) -> Judgement:
    """The claim's effect on the runs (one per seed, in the order the seeds ran) and its two raw p-values
    (sequential: repeated p-values over the looks); verdicts come from :func:`decide_family`. A run without
    the effect makes the claim *incomplete*, never a verdict on fewer seeds. ``within`` is the within-run
    uncertainty of a single run."""
    j = Judgement(claim, margin, ())
    labels = list(labels) if labels is not None else [str(i) for i in range(len(runs))]
    if not runs:
        return j
    applies = [claim.comparable is None or claim.comparable(r) for r in runs]
    if not any(applies):
        j.verdict = f"not comparable ({claim.condition})"
        return j
    raw = [claim.effect(r) if ok else None for r, ok in zip(runs, applies)]
    good = [v is not None and math.isfinite(v) and (v > 0 or not claim.log_scale) for v in raw]
    if not any(good) and all(missing_what(claim, r).startswith("stage ") for r in runs):
        return j  # not run: the stages it reads are not in these runs
    if not all(good):
        j.values = tuple(v for v, ok in zip(raw, good) if ok)  # type: ignore[misc]
        j.verdict = (f"incomplete (n = {len(j.values)} of {len(runs)}; "
                     + "; ".join(f"seed {lab}: {missing_what(claim, r)}" for lab, r, ok in zip(labels, runs, good)
                                 if not ok) + ")")
        return j
    j.values = tuple(raw)  # type: ignore[arg-type]
    j.verdict = "inconclusive"  # until the family decides
    test_values = [_to_test(claim, v) for v in j.values]
    sample = stats.Sample.of(test_values)
    j.test_sd = sample.sd
    if sample.n >= 2:
        mean, low, high = stats.t_interval(test_values)
        j.interval = "exact" if sample.exact else "seeds"
        if sequential is not None:
            t = _combine(claim.hypothesis, margin, _sequential_p(test_values, sequential))
        else:
            t = tests_of(claim.hypothesis, sample, margin)
    elif within is not None and within.kind != "exact":
        mean = test_values[0]
        if within.replicates is not None:
            reps = np.log(within.replicates) if claim.log_scale else np.asarray(within.replicates)
            low, high = (float(np.quantile(reps, q)) for q in (0.025, 0.975))
            t = tests_of(claim.hypothesis, None, margin, reps)
        else:
            mean, low, high = stats.t_interval(within.values)
            t = tests_of(claim.hypothesis, within.sample, margin)
        j.interval = within.kind
    elif within is not None:  # exact: a property of the model, no sampling error within the run
        mean = low = high = test_values[0]
        j.interval = "exact"
        t = tests_of(claim.hypothesis, stats.Sample(mean, 0.0, 2), margin)
    else:
        mean = low = high = test_values[0]
        j.interval = "none"
        t = Tests(math.nan, math.nan)
    j.mean, j.low, j.high = (_from_test(claim, v) for v in (mean, low, high))
    j.p_yes, j.p_no = t.p_yes, t.p_no
    return j


def _sequential_p(test_values: list[float], seq: Sequential) -> Callable[[float, stats.Side], float]:
    """p(bound, side): the repeated p-value of that one-sided test over the looks (seeds 1..n_k at look k)."""
    done = [n for n in seq.looks if n <= len(test_values)]

    def p(bound: float, side: stats.Side) -> float:
        t = [stats.t_statistic(stats.Sample.of(test_values[:n]), bound, side) for n in done]
        return stats.repeated_t_p(t, seq.looks, seq.spending)

    return p


def missing_what(claim: Claim, run: RunMetrics) -> str:
    """Which side of the claim a run lacks, in words (``convert@sdconv test_acc missing``)."""
    for side in claim.effect.sides:
        v = run.get(side.stage, {}).get(side.metric)
        if side.stage not in run:
            return f"stage {side.stage} missing"
        if v is None:
            return f"{side.stage} {side.metric} missing"
        if not math.isfinite(float(v)):
            return f"{side.stage} {side.metric} not finite ({v})"
    if claim.comparable is not None and not claim.comparable(run):
        return f"not comparable ({claim.condition})"
    return "effect not defined"


@dataclass(frozen=True)
class WithinRun:
    """Within-run uncertainty of a single run's effect: bootstrap replicates over test images, per-session
    values (timing sessions), or exact (a property of the model)."""

    kind: str  # "test images" | "timing sessions" | "exact"
    replicates: np.ndarray | None = None  # natural scale
    values: tuple[float, ...] = ()  # timing sessions, test scale

    @property
    def sample(self) -> stats.Sample:
        return stats.Sample.of(self.values)


def decide_family(judgements: Sequence[Judgement], alpha: float, power: float = 0.8) -> list[Judgement]:
    """Holm over the 2m one-sided p-values of every judged claim, then each claim's verdict; inconclusive
    ones get the seeds that would resolve them at the observed mean and spread."""
    judged = [j for j in judgements if j.judged]
    flat = [p for j in judged for p in (j.p_yes, j.p_no)]
    adjusted = stats.holm(flat)
    family = sum(1 for p in flat if math.isfinite(p))
    for i, j in enumerate(judged):
        j.p_yes_adj, j.p_no_adj = adjusted[2 * i], adjusted[2 * i + 1]
        yes, no = j.p_yes_adj <= alpha, j.p_no_adj <= alpha
        j.note = ""
        if yes:
            j.verdict = "reproduced"
            if no:
                j.note = f"gain below the smallest effect of interest ({j.margin * j.claim.scale:g}{j.claim.unit})"
        elif no:
            j.verdict = "not reproduced"
        else:
            j.verdict = "inconclusive"
            j.seeds_needed = seeds_to_resolve(j, alpha / max(family, 1), power)
    return list(judgements)


def seeds_to_resolve(j: Judgement, alpha: float, power: float) -> int | None:
    """Seeds for one of the claim's tests to reach ``power`` at level ``alpha`` (Holm's first step) if the
    observed mean and per-seed spread were true; None when no number resolves it or the spread is unknown."""
    if j.n < 2 or not math.isfinite(j.test_sd):
        return None
    mean = _to_test(j.claim, j.mean) if j.claim.log_scale else j.mean
    best = None
    for direction in ("yes", "no"):
        rows = [(b, s) for d, b, s in yes_no_bounds(j.claim.hypothesis, j.margin) if d == direction]
        if direction == "yes" or len(rows) == 1:
            # every row must hold (TOST) for "yes": the farthest-from-resolved row decides
            distances = [(mean - b) if s == "greater" else (b - mean) for b, s in rows]
            distance = min(distances)
        else:  # either row suffices for the complement of equivalence
            distance = max((mean - b) if s == "greater" else (b - mean) for b, s in rows)
        level = alpha / 2 if j.claim.hypothesis == "equivalence" and direction == "no" else alpha
        n = stats.seeds_needed(distance, j.test_sd, level, power)
        if n is not None and (best is None or n < best):
            best = n
    return best


def judge(claim: Claim, runs: Sequence[RunMetrics], margin: float, alpha: float = 0.05) -> Judgement:
    """One claim judged alone (a family of one): for tests and single-claim use."""
    return decide_family([measure(claim, margin, runs)], alpha)[0]


class _ReadRecorder(dict):
    """An empty :data:`RunMetrics` that records which stages are asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: set[str] = set()

    def get(self, stage, default=None):
        self.stages.add(stage)
        return default

    def __getitem__(self, stage):
        self.stages.add(stage)
        raise KeyError(stage)


def stages_read(claims: list[Claim]) -> set[str]:
    """The pipeline stages whose metrics the claims' effects (and applicability tests) read: what a seed
    study must run to judge them."""
    run = _ReadRecorder()
    for claim in claims:
        run.stages.update(s.stage for s in claim.effect.sides)
        if claim.comparable is not None:
            try:
                claim.comparable(run)
            except (KeyError, TypeError):  # an applicability test that indexes directly still named its stage
                pass
    return run.stages


def metric(run: RunMetrics, stage: str, name: str) -> float | None:
    """One final metric of one stage of a run; None when the stage did not run or has no such metric."""
    value = run.get(stage, {}).get(name)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def same(run: RunMetrics, a: str, b: str, names: tuple[str, ...]) -> bool:
    """Whether stages ``a`` and ``b`` of a run measured equal values of every metric in ``names`` (comparability)."""
    return all(metric(run, a, n) is not None and metric(run, a, n) == metric(run, b, n) for n in names)


__all__ = ["Claim", "Effect", "Side", "Judgement", "WithinRun", "RULES", "HYPOTHESES", "measure", "decide_family",
           "judge", "difference", "ratio", "value", "metric", "same", "stages_read"]
