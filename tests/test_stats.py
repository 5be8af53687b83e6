"""pipeline/stats.py against values computed by hand, published tables, an independent library
(statsmodels) and simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from pipeline import stats


def test_t_interval_by_hand():
    mean, low, high = stats.t_interval([1.0, 2.0])  # sd 0.7071, t(0.975, 1) = 12.7062
    assert (low, high) == pytest.approx((1.5 - 12.7062 * 0.5, 1.5 + 12.7062 * 0.5), abs=1e-3)
    assert stats.t_interval([3.0]) == (3.0, 3.0, 3.0)
    assert stats.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)  # exact: no spread


def test_one_sided_p_matches_scipy_ttest():
    x = [0.3, -0.1, 0.5, 0.2, 0.05]
    s = stats.Sample.of(x)
    for bound in (-0.2, 0.0, 0.4):
        assert stats.one_sided_p(s, bound, "greater") == pytest.approx(
            sps.ttest_1samp(x, bound, alternative="greater").pvalue, rel=1e-9)
        assert stats.one_sided_p(s, bound, "less") == pytest.approx(
            sps.ttest_1samp(x, bound, alternative="less").pvalue, rel=1e-9)
    exact = stats.Sample(1.0, 0.0, 3)
    assert stats.one_sided_p(exact, 0.5, "greater") == 0.0 and stats.one_sided_p(exact, 1.0, "greater") == 1.0
    assert math.isnan(stats.one_sided_p(stats.Sample(1.0, math.nan, 1), 0.0, "greater"))


def test_tost_matches_statsmodels_and_the_90_percent_interval():
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(3)
    a = rng.normal(0.5, 0.02, 8)
    b = a - rng.normal(0.004, 0.01, 8)
    p = stats.tost_p(stats.Sample.of(a - b), -0.02, 0.02)
    assert p == pytest.approx(ttost_paired(a, b, -0.02, 0.02)[0], rel=1e-9)
    # equivalent at 5 % iff the 90 % interval lies inside the margins
    _, low, high = stats.t_interval(list(a - b), 0.90)
    for margin in (0.5 * max(abs(low), abs(high)), 1.01 * max(abs(low), abs(high)), 2 * max(abs(low), abs(high))):
        inside = -margin <= low and high <= margin
        assert (stats.tost_p(stats.Sample.of(a - b), -margin, margin) <= 0.05) == inside


def test_holm_on_a_known_set():
    # by hand: sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> max(0.06, 0.04)
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = stats.holm([0.01, math.nan, 0.02])  # nan is not in the family
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    assert stats.holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())


def test_obrien_fleming_spending_boundaries_match_the_published_table():
    # Lan-DeMets O'Brien-Fleming-type spending, 5 equally spaced looks, one-sided alpha 0.025
    # (Jennison & Turnbull 2000, Table 7.x; gsDesign sfLDOF): 4.877, 3.357, 2.680, 2.290, 2.031.
    c = stats.boundaries(0.025, (0.2, 0.4, 0.6, 0.8, 1.0), "obrien_fleming")
    assert c == pytest.approx((4.877, 3.357, 2.680, 2.290, 2.031), abs=2e-3)
    assert stats.boundaries(0.025, (1.0,), "pocock") == pytest.approx((sps.norm.isf(0.025),), abs=1e-9)


@pytest.mark.parametrize("spending", ["obrien_fleming", "pocock"])
def test_group_sequential_t_test_keeps_its_type_one_error(spending):
    """Looks after 3, 4, 5, 6 and 8 seeds of normal data (mean on the bound, any spread): the share of
    simulated studies (an independent seed from the calibration's) whose repeated p-value reaches alpha
    stays at or below alpha; with the nominal-significance conversion of t to z it did not (6.2 %)."""
    alpha, looks, sims = 0.05, (3, 4, 5, 6, 8), 3000
    c = stats.t_boundaries(alpha, looks, spending)
    rng = np.random.default_rng(11)
    crossed = 0
    for i in range(sims):
        x = rng.normal(0.0, 3.0, looks[-1])
        t = [stats.t_statistic(stats.Sample.of(x[:n]), 0.0, "greater") for n in looks]
        crossed += any(v >= ck for v, ck in zip(t, c))
        if i < 300 and abs(max(v - ck for v, ck in zip(t, c))) > 0.05:  # the repeated p-value says the same
            assert (stats.repeated_t_p(t, looks, spending) <= alpha) == any(v >= ck for v, ck in zip(t, c))
    rate = crossed / sims
    assert rate <= alpha + 2.5 * math.sqrt(alpha * (1 - alpha) / sims), rate
    # and looking after every seed with the fixed-sample test would not
    naive = 0
    for _ in range(sims):
        x = rng.normal(0.0, 1.0, looks[-1])
        naive += any(stats.one_sided_p(stats.Sample.of(x[:n]), 0.0, "greater") <= alpha for n in looks)
    assert naive / sims > alpha + 2.5 * math.sqrt(alpha * (1 - alpha) / sims)


def test_repeated_p_value_is_the_smallest_alpha_that_crosses():
    looks = (3, 4, 6, 8)
    t = [1.2, 6.5]
    p = stats.repeated_t_p(t, looks, "obrien_fleming")
    assert 0 < p < 0.05
    assert any(v >= c for v, c in zip(t, stats.t_boundaries(p * 1.1, looks, "obrien_fleming")))
    assert not any(v >= c for v, c in zip(t, stats.t_boundaries(p * 0.9, looks, "obrien_fleming")))
    assert stats.repeated_t_p([2.0], (5,), "pocock") == pytest.approx(sps.t.sf(2.0, 4), rel=1e-9)  # one look: fixed
    assert stats.repeated_t_p([-1.0, -0.5], looks, "pocock") == 1.0
    # O'Brien-Fleming spends little early: the first look's boundary is far above the last one's
    c = stats.t_boundaries(0.05, looks, "obrien_fleming")
    assert c[0] > 2 * c[-1] and c[-1] > sps.t.isf(0.05, 7)


def test_seeds_needed_matches_statsmodels_and_a_simulation():
    from statsmodels.stats.power import TTestPower

    distance, sd, alpha = 0.5, 1.0, 0.025
    n = stats.seeds_needed(distance, sd, alpha, 0.8)
    assert n == math.ceil(TTestPower().solve_power(effect_size=distance / sd, alpha=alpha, power=0.8,
                                                   alternative="larger"))
    rng = np.random.default_rng(5)
    x = rng.normal(distance, sd, size=(4000, n))
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(n))
    power = float(np.mean(t > sps.t.isf(alpha, n - 1)))
    assert 0.78 <= power <= 0.85
    assert stats.seeds_needed(-0.1, 1.0, 0.05) is None  # the mean lies on the null side


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(2)
    a = (rng.uniform(size=1000) < 0.93).astype(float)
    b = np.where(rng.uniform(size=1000) < 0.1, 1 - a, a)  # differs on about 10 % of the images
    reps = stats.paired_bootstrap(a, b, "difference", 4000, 0)
    d = a - b
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert float(reps.mean()) == pytest.approx(d.mean(), abs=0.2 * se)
    assert float(np.quantile(reps, 0.975) - np.quantile(reps, 0.025)) == pytest.approx(2 * 1.96 * se, rel=0.1)
    # pairing: identical vectors give a zero-width interval, unpaired resampling would not
    assert np.all(stats.paired_bootstrap(a, a, "difference", 200, 0) == 0)
    p = stats.bootstrap_p(reps, 0.0, "greater")
    assert (p <= 0.025) == (np.quantile(reps, 0.025) > 0)
