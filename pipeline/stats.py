"""Statistics for verdicts: intervals, one-sided tests, equivalence, multiplicity, sequential boundaries,
seeds needed and the paired bootstrap. No claim knowledge lives here (that is :mod:`pipeline.claims`).

- Student's t interval and one-sided t tests of a mean against a bound (paired effects: one value per
  seed, or per timing session).
- Two one-sided tests for equivalence (Schuirmann 1987): equivalent at level alpha when the
  ``1 - 2 alpha`` interval lies inside the margins.
- Holm's step-down adjustment (Holm 1979): strong family-wise error control under any dependence.
- Group-sequential boundaries from an alpha-spending function (Lan & DeMets 1983; O'Brien-Fleming-type
  and Pocock-type spending): for a known variance (z) by recursive numerical integration of the score
  process (Armitage, McPherson & Rowe 1969; Jennison & Turnbull 2000, ch. 19); for the t statistic of a
  few seeds by simulation under the null, where the t process is pivotal. The nominal-significance
  conversion of t to z (Jennison & Turnbull 2000, 11.3) lets a 3-to-8-seed study cross 6.2 % of the
  time at alpha 5 % (tests/test_stats.py), so the study uses the simulated t boundaries. The repeated
  p-value of a test seen at several looks is the smallest alpha whose boundary it crossed.
- Seeds needed for a one-sided paired t test at a given power (noncentral t, exact for normal data).
- Paired percentile bootstrap over test images: the same resampled indices for both models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np


class _LazyModule:
    """A module imported on first attribute access: every stage imports the claims (and so this module), and
    importing scipy.stats costs about a second per process (the latency stage starts dozens)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import importlib

        return getattr(importlib.import_module(self._name), attr)


stats = _LazyModule("scipy.stats")
optimize = _LazyModule("scipy.optimize")

Side = Literal["greater", "less"]  # the alternative: mean > bound, or mean < bound
Spending = Literal["obrien_fleming", "pocock"]


@dataclass(frozen=True)
class Sample:
    """Summary of paired effects: mean, standard deviation (ddof 1) and count."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Sample:
        v = np.asarray(values, dtype=float)
        if len(v) == 0:
            raise ValueError("no values")
        return cls(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v))

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n)

    @property
    def exact(self) -> bool:
        """Every value equal (e.g. a ratio of architecture MACs): no sampling error to test."""
        return self.n > 1 and self.sd == 0.0


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student's t interval; one value gives the point itself."""
    s = Sample.of(values)
    if s.n == 1 or s.exact:
        return s.mean, s.mean, s.mean
    half = float(stats.t.ppf(0.5 + level / 2, s.n - 1)) * s.se
    return s.mean, s.mean - half, s.mean + half


def one_sided_p(sample: Sample, bound: float, side: Side) -> float:
    """p-value of the one-sided t test of ``H0: mean <= bound`` (side ``greater``) or ``H0: mean >= bound``
    (side ``less``). An exact sample (sd 0) gives 0 when its value lies strictly on the alternative's side,
    else 1; a single value cannot be tested (nan)."""
    if sample.n < 2:
        return math.nan
    diff = sample.mean - bound if side == "greater" else bound - sample.mean
    if sample.exact:
        return 0.0 if diff > 0 else 1.0
    return float(stats.t.sf(diff / sample.se, sample.n - 1))


def tost_p(sample: Sample, low: float, high: float) -> float:
    """Two one-sided tests of ``H0: mean <= low or mean >= high``: the larger of the two p-values
    (equivalence at level alpha iff the ``1 - 2 alpha`` t interval lies inside ``[low, high]``)."""
    return max(one_sided_p(sample, low, "greater"), one_sided_p(sample, high, "less"))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan stays nan and is not counted in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    idx = [i for i in np.argsort(p, kind="stable") if not math.isnan(p[i])]
    m, running = len(idx), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


# ------------------------------------------------------------------ group-sequential boundaries
def spent(alpha: float, t: float, spending: Spending) -> float:
    """Alpha spent by information fraction ``t`` (Lan & DeMets 1983): O'Brien-Fleming-type
    ``2 - 2 Phi(z_{1-alpha/2} / sqrt(t))``, Pocock-type ``alpha ln(1 + (e - 1) t)``."""
    if t <= 0:
        return 0.0
    t = min(t, 1.0)
    if spending == "obrien_fleming":
        return float(2.0 - 2.0 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / math.sqrt(t)))
    if spending == "pocock":
        return float(alpha * math.log(1 + (math.e - 1) * t))
    raise ValueError(f"unknown spending function {spending!r}")


_GRID = 801  # points of the score density per look


@lru_cache(maxsize=4096)
def boundaries(alpha: float, fractions: tuple[float, ...], spending: Spending) -> tuple[float, ...]:
    """One-sided upper z boundaries ``c_1..c_K`` at the information fractions (increasing, last <= 1) such
    that ``P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c_k) = spent(t_k) - spent(t_{k-1})`` under H0.

    The score ``S_k = Z_k sqrt(t_k)`` has independent normal increments of variance ``t_k - t_{k-1}``;
    its sub-density on the continuation region is carried from look to look on a grid (trapezoid rule).
    """
    if any(b <= a for a, b in zip(fractions, fractions[1:])) or not 0 < fractions[0] or fractions[-1] > 1 + 1e-12:
        raise ValueError(f"information fractions must increase within (0, 1], got {fractions}")
    out: list[float] = []
    prev_t, prev_spent = 0.0, 0.0
    grid = density = None
    for t in fractions:
        target = spent(alpha, t, spending) - prev_spent
        sd = math.sqrt(t - prev_t)
        if grid is None:
            c = float(stats.norm.isf(max(target, 1e-300)))
            grid = np.linspace(-8 * math.sqrt(t), c * math.sqrt(t), _GRID)
            density = stats.norm.pdf(grid, scale=sd)
        else:
            weights = _trapezoid(grid) * density

            def exceed(c: float) -> float:
                return float(weights @ stats.norm.sf((c * math.sqrt(t) - grid) / sd)) - target

            c = 40.0 if target <= 0 or exceed(40.0) >= 0 else float(optimize.brentq(exceed, -40.0, 40.0, xtol=1e-9))
            new = np.linspace(-8 * math.sqrt(t), c * math.sqrt(t), _GRID)
            kernel = stats.norm.pdf((new[:, None] - grid[None, :]) / sd) / sd
            density, grid = kernel @ weights, new
        out.append(c)
        prev_t, prev_spent = t, spent(alpha, t, spending)
    return tuple(out)


def _trapezoid(grid: np.ndarray) -> np.ndarray:
    h = np.diff(grid)
    w = np.zeros_like(grid)
    w[:-1] += h / 2
    w[1:] += h / 2
    return w


NULL_SIMULATIONS = 200_000


@lru_cache(maxsize=8)
def _null_t(looks: tuple[int, ...], sims: int, seed: int) -> np.ndarray:
    """t statistics ``[sims, K]`` at the looks of studies of standard normal values whose mean is the bound:
    pivotal (free of the spread), so they calibrate boundaries for any normal effect."""
    rng = np.random.default_rng(seed)
    out = np.empty((sims, len(looks)))
    for start in range(0, sims, 50_000):
        x = rng.standard_normal((min(50_000, sims - start), looks[-1]))
        s, s2 = np.cumsum(x, 1), np.cumsum(x * x, 1)
        for k, n in enumerate(looks):
            mean = s[:, n - 1] / n
            var = np.maximum(s2[:, n - 1] - n * mean * mean, 1e-300) / (n - 1)
            out[start : start + len(x), k] = mean / np.sqrt(var / n)
    return out


@lru_cache(maxsize=65536)
def t_boundaries(alpha: float, looks: tuple[int, ...], spending: Spending, sims: int = NULL_SIMULATIONS,
                 seed: int = 20260) -> tuple[float, ...]:
    """One-sided boundaries for the t statistic at looks after ``looks[k]`` values (the last is the planned
    maximum; information fraction ``n_k / n_K``): at each look the boundary lets exactly the alpha spent since
    the previous look cross among the simulated null studies that have not crossed yet (Monte Carlo over
    :data:`NULL_SIMULATIONS` studies, seeded: the same boundaries every call). Needs ``looks[0] >= 2``."""
    if looks[0] < 2 or any(b <= a for a, b in zip(looks, looks[1:])):
        raise ValueError(f"looks must increase from at least 2 values, got {looks}")
    t = _null_t(looks, sims, seed)
    alive = np.ones(sims, dtype=bool)
    out, before = [], 0.0
    for k, n in enumerate(looks):
        now = spent(alpha, n / looks[-1], spending)
        count = int(round((now - before) * sims))
        before = now
        if count <= 0:
            out.append(math.inf)
            continue
        survivors = t[alive, k]
        c = float(np.partition(survivors, len(survivors) - count)[len(survivors) - count]) if count <= len(survivors) \
            else -math.inf
        out.append(c)
        alive &= ~(t[:, k] >= c)
    return tuple(out)


ALPHA_GRID = 160  # log-spaced alphas of the boundary table behind repeated p-values


@lru_cache(maxsize=64)
def boundary_table(looks: tuple[int, ...], spending: Spending) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, boundaries ``[len(alphas), K]``): :func:`t_boundaries` on a log-spaced grid of alphas from
    ``1 / NULL_SIMULATIONS`` to 0.5; every column decreases as alpha grows."""
    alphas = np.geomspace(1.0 / NULL_SIMULATIONS, 0.5, ALPHA_GRID)
    table = np.array([t_boundaries(float(a), looks, spending) for a in alphas])
    return alphas, np.minimum.accumulate(table, axis=0)


def repeated_t_p(t_by_look: Sequence[float], looks: Sequence[int], spending: Spending) -> float:
    """The smallest alpha at which the one-sided group-sequential t test with these planned looks would have
    crossed its boundary at some look so far: ``min{alpha : exists k, t_k >= c_k(alpha)}``, read from the
    boundary table (log-linear between its alphas; floor ``1 / NULL_SIMULATIONS``). One planned look gives
    the fixed-sample p-value of the t test."""
    t = [float(v) for v in t_by_look]
    looks = tuple(int(n) for n in looks)
    if len(looks) == 1:
        return 1.0 if math.isnan(t[0]) else float(stats.t.sf(t[0], looks[0] - 1))
    alphas, table = boundary_table(looks, spending)
    best = 1.0
    for k, v in enumerate(t):
        if math.isnan(v):
            continue
        col = table[:, k]
        hit = np.nonzero(col <= v)[0]
        if not len(hit):
            continue
        i = int(hit[0])
        if i == 0:
            return float(alphas[0])
        # c decreases from col[i-1] (> v) to col[i] (<= v): interpolate log alpha where c = v
        c0, c1 = col[i - 1], col[i]
        w = 1.0 if not math.isfinite(c0) else (c0 - v) / (c0 - c1)
        best = min(best, float(math.exp(math.log(alphas[i - 1]) + w * (math.log(alphas[i]) - math.log(alphas[i - 1])))))
    return best


def t_statistic(sample: Sample, bound: float, side: Side) -> float:
    """The one-sided t statistic (positive towards the alternative); an exact sample gives +-inf."""
    diff = sample.mean - bound if side == "greater" else bound - sample.mean
    if sample.exact:
        return math.inf if diff > 0 else -math.inf
    return diff / sample.se


# ------------------------------------------------------------------ planning
def t_power(n: int, distance: float, sd: float, alpha: float) -> float:
    """Power of the one-sided paired t test at level ``alpha`` with ``n`` values when the true mean lies
    ``distance`` (> 0) beyond the bound on the alternative's side (noncentral t)."""
    if n < 2:
        return 0.0
    if sd == 0:
        return 1.0
    crit = stats.t.isf(alpha, n - 1)
    return float(stats.nct.sf(crit, n - 1, distance * math.sqrt(n) / sd))


def seeds_needed(distance: float, sd: float, alpha: float, power: float = 0.8, limit: int = 100_000) -> int | None:
    """Fewest values for a one-sided paired t test at level ``alpha`` to reach ``power`` when the true mean
    lies ``distance`` beyond the bound (the normal approximation
    ``((z_{1-alpha} + z_{power}) sd / distance)^2`` as the start, then noncentral t). None: the mean lies on
    the null side (no number of seeds resolves it that way) or more than ``limit``."""
    if not (distance > 0) or not math.isfinite(sd):
        return None
    if sd == 0:
        return 2
    start = max(2, math.ceil(((stats.norm.isf(alpha) + stats.norm.ppf(power)) * sd / distance) ** 2))
    n = start
    while n > 2 and t_power(n - 1, distance, sd, alpha) >= power:
        n -= 1
    while t_power(n, distance, sd, alpha) < power:
        n += 1
        if n > limit:
            return None
    return n


# ------------------------------------------------------------------ bootstrap
def paired_bootstrap(a: np.ndarray, b: np.ndarray | None, statistic: str, replicates: int,
                     seed: int) -> np.ndarray:
    """Bootstrap replicates of a paired statistic over test images: each replicate resamples image indices
    once and applies them to both per-image vectors (``a`` and ``b``: per-image correctness, 0/1).
    ``statistic``: ``difference`` (mean a - mean b), ``ratio`` (mean a / mean b) or ``mean`` (mean a)."""
    a = np.asarray(a, dtype=float)
    if b is not None:
        b = np.asarray(b, dtype=float)
        if b.shape != a.shape:
            raise ValueError(f"paired vectors differ in length: {a.shape} vs {b.shape}")
    rng = np.random.default_rng(seed)
    out = np.empty(replicates)
    n = len(a)
    for start in range(0, replicates, 256):
        idx = rng.integers(0, n, size=(min(256, replicates - start), n))
        ma = a[idx].mean(1)
        if statistic == "mean":
            out[start : start + len(idx)] = ma
            continue
        mb = b[idx].mean(1)
        out[start : start + len(idx)] = ma - mb if statistic == "difference" else ma / mb
    return out


def bootstrap_p(replicates: np.ndarray, bound: float, side: Side) -> float:
    """One-sided bootstrap p-value: the share of replicates on the null side of the bound (with the usual
    +1 correction), so that the percentile interval at level 1 - 2 alpha excludes the bound iff p <= alpha."""
    r = np.asarray(replicates)
    null = np.count_nonzero(r <= bound) if side == "greater" else np.count_nonzero(r >= bound)
    return float((null + 1) / (len(r) + 1))
