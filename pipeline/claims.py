"""The papers' claims as data, and verdicts with confidence intervals over training seeds.

A :class:`Claim` is one statement of a paper, with its source, judged on a
*paired effect*: a number computed from the metrics of one pipeline execution
(one training seed), e.g. "method test accuracy minus dense test accuracy" or
"method MACs / dense MACs", and a comparison against its bound
(``claims.<method>.<name>`` in params.yaml):

- ``at_least``: reproduced when the whole 95 % CI of the effect lies at or
  above the bound, not reproduced when it lies below, inconclusive otherwise;
- ``at_most``: the mirror image;
- ``within``: reproduced when the CI lies inside ``[-bound, +bound]``, not
  reproduced when it lies entirely outside, inconclusive otherwise.

With one seed the CI is the point itself and the verdict says "single seed".
The CI is Student's t over the per-seed effects (mean +- t_{0.975, n-1} * s / sqrt(n)),
so a claim against dense or a control is judged on effects paired by seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# stage -> final metric -> value, for one pipeline execution (one training seed)
RunMetrics = dict[str, dict[str, float]]
Compare = Literal["at_least", "at_most", "within"]
VERDICTS = ("reproduced", "not reproduced", "inconclusive")


@dataclass(frozen=True)
class Claim:
    """One claim of a paper; ``effect`` computes the paired effect of one run (None: not measurable there)."""

    method: str  # the method module that states it
    name: str  # its bound is params claims.<method>.<name>
    paper: str  # the source
    where: str  # section / table / figure of the source (or "abstract")
    statement: str  # what the paper states, in one sentence
    effect_label: str  # what the effect is, e.g. "test accuracy, method minus dense (points)"
    compare: Compare
    effect: Callable[[RunMetrics], float | None]
    reference: str = "dense"  # what the effect is paired against: dense, a control, another method
    scale: float = 1.0  # shown effect = effect * scale (100 for accuracy points)
    unit: str = ""
    control: str | None = None  # the control method judged against, if any
    comparable: Callable[[RunMetrics], bool] | None = None  # runs where the claim applies (e.g. the same width)
    condition: str = ""  # when it applies, in words

    @property
    def id(self) -> str:
        return f"{self.method}.{self.name}"


@dataclass(frozen=True)
class Judgement:
    claim: Claim
    values: tuple[float, ...]  # the per-seed effects
    bound: float
    mean: float
    low: float
    high: float
    verdict: str  # reproduced | not reproduced | inconclusive | not run

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def single_seed(self) -> bool:
        return self.n == 1

    def shown(self) -> str:
        """The measured effect with its CI, or marked as a single seed."""
        if not self.values:
            return "not measured"
        s, u = self.claim.scale, self.claim.unit
        f = "{:.3g}" if u == " x" else "{:+.3g}"  # ratios unsigned, differences signed
        if self.single_seed:
            return f"{f.format(self.mean * s)}{u} (single seed)"
        return (f"{f.format(self.mean * s)}{u} [95 % CI {f.format(self.low * s)}, {f.format(self.high * s)}] "
                f"(n = {self.n})")

    def shown_verdict(self) -> str:
        return f"{self.verdict} (single seed)" if self.single_seed and self.verdict in VERDICTS else self.verdict

    def shown_bound(self) -> str:
        s, u = self.claim.scale, self.claim.unit
        ops = {"at_least": ">=", "at_most": "<=", "within": "within +-"}
        return f"{ops[self.claim.compare]} {self.bound * s:g}{u}"


def t_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval; one value gives the point itself."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


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
        for fn in filter(None, (claim.effect, claim.comparable)):
            try:
                fn(run)
            except (KeyError, TypeError):  # an effect that indexes directly still named its stage
                pass
    return run.stages


def decide(compare: Compare, low: float, high: float, bound: float) -> str:
    """The verdict of an interval [low, high] against the bound (see the module docstring)."""
    if compare == "at_least":
        return "reproduced" if low >= bound else "not reproduced" if high < bound else "inconclusive"
    if compare == "at_most":
        return "reproduced" if high <= bound else "not reproduced" if low > bound else "inconclusive"
    if compare == "within":
        if -bound <= low and high <= bound:
            return "reproduced"
        return "not reproduced" if high < -bound or low > bound else "inconclusive"
    raise ValueError(f"unknown comparison {compare!r}")


def judge(claim: Claim, runs: list[RunMetrics], bound: float) -> Judgement:
    """The claim judged on the runs (one per training seed) against its bound from params."""
    applicable = [r for r in runs if claim.comparable is None or claim.comparable(r)]
    values = [v for v in (claim.effect(r) for r in applicable) if v is not None and math.isfinite(v)]
    if not values:
        verdict = f"not comparable ({claim.condition})" if runs and not applicable else "not run"
        return Judgement(claim, (), bound, math.nan, math.nan, math.nan, verdict)
    mean, low, high = confidence_interval(values)
    return Judgement(claim, tuple(values), bound, mean, low, high, decide(claim.compare, low, high, bound))


def metric(run: RunMetrics, stage: str, name: str) -> float | None:
    """One final metric of one stage of a run; None when the stage did not run or has no such metric."""
    value = run.get(stage, {}).get(name)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def difference(run: RunMetrics, a: tuple[str, str], b: tuple[str, str]) -> float | None:
    """``a - b`` for two (stage, metric) pairs of the same run."""
    x, y = metric(run, *a), metric(run, *b)
    return None if x is None or y is None else x - y


def same(run: RunMetrics, a: str, b: str, names: tuple[str, ...]) -> bool:
    """Whether stages ``a`` and ``b`` of a run measured equal values of every metric in ``names`` (comparability)."""
    return all(metric(run, a, n) is not None and metric(run, a, n) == metric(run, b, n) for n in names)


def ratio(run: RunMetrics, a: tuple[str, str], b: tuple[str, str]) -> float | None:
    x, y = metric(run, *a), metric(run, *b)
    return None if x is None or y is None or y == 0 else x / y
