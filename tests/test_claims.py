"""Verdicts on constructed numbers: every hypothesis type reaching each outcome, Holm across a family,
incomplete studies, single runs with within-run intervals, like-with-like sides, the seeds needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from pipeline import methods
from pipeline.claims import (HYPOTHESES, Claim, Sequential, WithinRun, decide_family, difference, judge, measure, ratio,
                             stages_read, value)
from pipeline.report.verdicts import judge_all, mismatch

from .conftest import config

EFFECT = difference(("convert@m", "test_acc"), ("pretrain", "test_acc"))


def runs_with(effects, base=0.9):
    return [{"pretrain": {"test_acc": base}, "convert@m": {"test_acc": base + d}} for d in effects]


def claim(hypothesis, effect=EFFECT) -> Claim:
    return Claim("m", "acc", "A paper", "Table 1", "No accuracy loss.", "method minus dense", hypothesis, effect,
                 "dense", 100, " points")


SPEED = value(("latency", "m_speedup_b1"))


def speed_runs(values):
    return [{"latency": {"m_speedup_b1": v}} for v in values]


# (hypothesis, margin, effects giving "reproduced", effects giving "not reproduced"): spreads small enough
# to resolve with 4 seeds, means on either side of the margins.
CASES = [
    ("non_inferiority", 0.01, [0.001, 0.0, 0.002, -0.001], [-0.05, -0.052, -0.049, -0.051]),
    ("superiority", 0.01, [0.03, 0.031, 0.029, 0.032], [0.0, 0.001, -0.001, 0.0005]),
    ("equivalence", 0.05, [0.001, -0.002, 0.0, 0.002], [0.12, 0.121, 0.119, 0.122]),
]


@pytest.mark.parametrize("hypothesis, margin, yes, no", CASES)
def test_each_difference_type_resolves_both_ways(hypothesis, margin, yes, no):
    assert judge(claim(hypothesis), runs_with(yes), margin).verdict == "reproduced"
    assert judge(claim(hypothesis), runs_with(no), margin).verdict == "not reproduced"
    assert judge(claim(hypothesis), runs_with([margin, -margin, 2 * margin, 0.0]), margin).verdict == "inconclusive"


@pytest.mark.parametrize("hypothesis, yes, no", [
    ("ratio_at_least", [1.9, 2.0, 1.95, 2.05], [1.2, 1.25, 1.22, 1.18]),
    ("ratio_at_most", [1.2, 1.25, 1.22, 1.18], [1.9, 2.0, 1.95, 2.05]),
])
def test_ratio_types_resolve_both_ways_on_the_log_scale(hypothesis, yes, no):
    c = claim(hypothesis, SPEED)
    assert judge(c, speed_runs(yes), 1.6).verdict == "reproduced"
    assert judge(c, speed_runs(no), 1.6).verdict == "not reproduced"
    j = judge(c, speed_runs([1.5, 1.7]), 1.6)
    logs = np.log([1.5, 1.7])
    assert j.mean == pytest.approx(math.exp(logs.mean()))  # the geometric mean
    half = sps.t.ppf(0.975, 1) * logs.std(ddof=1) / math.sqrt(2)
    assert (j.low, j.high) == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    assert j.low > 0


def test_every_type_of_the_default_claims_has_a_case():
    used = {c.hypothesis for m in methods.in_pipeline(config()) for c in m.claims()}
    assert used <= set(HYPOTHESES) and used == {h for h, *_ in CASES} | {"ratio_at_least", "ratio_at_most"}


def test_superiority_below_the_smallest_effect_of_interest_is_reproduced_with_a_note():
    j = judge(claim("superiority"), runs_with([0.004, 0.0041, 0.0039, 0.00405, 0.00395]), 0.01)
    assert j.verdict == "reproduced" and "below the smallest effect" in j.shown_verdict()


def test_p_values_are_the_one_sided_t_tests_by_hand():
    effects = [-0.01, 0.0, -0.02]  # mean -0.01, sd 0.01
    j = judge(claim("non_inferiority"), runs_with(effects), 0.05)
    t = (-0.01 + 0.05) / (0.01 / math.sqrt(3))
    assert j.p_yes == pytest.approx(sps.t.sf(t, 2)) and j.p_no == pytest.approx(sps.t.cdf(t, 2))
    assert (j.low, j.high) == pytest.approx((-0.01 - 4.302653 * 0.01 / math.sqrt(3), -0.01 + 4.302653 * 0.01 / math.sqrt(3)))


def test_holm_across_the_family_can_turn_a_verdict_inconclusive():
    """A p-value that would pass alone (0.03 < 0.05) fails Holm's first step in a family of two claims
    (four one-sided tests: 0.03 x 4 > 0.05)."""
    c = claim("superiority")
    runs = runs_with([0.02, 0.035, 0.005, 0.03])
    alone = judge(c, runs, 0.01)
    assert alone.p_yes < 0.05 / 2 and alone.verdict == "reproduced"
    other = measure(claim("non_inferiority"), 0.01, runs_with([0.5, -0.5, 0.2, -0.2]))
    family = decide_family([measure(c, 0.01, runs), other], 0.05)
    assert family[0].p_yes_adj == pytest.approx(min(1, 4 * alone.p_yes)) and family[0].verdict == "inconclusive"
    assert family[0].seeds_needed is not None and family[0].seeds_needed > 4


def test_a_missing_or_non_finite_seed_makes_the_claim_incomplete():
    runs = runs_with([0.0, 0.01, 0.0])
    runs[1]["convert@m"]["test_acc"] = math.nan
    del runs[2]["convert@m"]["test_acc"]
    j = judge(claim("non_inferiority"), runs, 0.01)
    assert j.verdict.startswith("incomplete (n = 1 of 3; ")
    assert "seed 1: convert@m test_acc not finite (nan)" in j.verdict and "seed 2: convert@m test_acc missing" in j.verdict


def test_a_claim_without_its_stages_is_not_run_and_one_that_does_not_apply_says_so():
    assert judge(claim("non_inferiority"), [{"pretrain": {"test_acc": 0.9}}], 0.01).verdict == "not run"
    c = Claim("m", "acc", "P", "T", "S.", "e", "superiority", EFFECT, comparable=lambda r: False, condition="at width 1")
    assert judge(c, runs_with([0.0, 0.1]), 0.01).verdict == "not comparable (at width 1)"


def test_single_run_uses_its_within_run_interval():
    rng = np.random.default_rng(0)
    reps = rng.normal(0.02, 0.004, 2000)  # bootstrap replicates of method - dense
    j = decide_family([measure(claim("superiority"), 0.01, runs_with([0.02]), within=WithinRun("test images", reps))], 0.05)[0]
    assert j.verdict == "reproduced" and j.shown_verdict() == "reproduced (single seed; test-set interval)"
    assert j.low == pytest.approx(np.quantile(reps, 0.025))
    none = judge(claim("superiority"), runs_with([0.02]), 0.01)  # no within-run uncertainty: no verdict from a point
    assert none.verdict == "inconclusive" and none.interval == "none"
    sessions = WithinRun("timing sessions", values=tuple(np.log([1.20, 1.22, 1.19, 1.21])))
    s = decide_family([measure(claim("ratio_at_least", SPEED), 1.6, speed_runs([1.205]), within=sessions)], 0.05)[0]
    assert s.verdict == "not reproduced" and "timing-session interval" in s.shown_verdict()


def test_sequential_claims_use_repeated_p_values():
    seq = Sequential((3, 4, 6), "obrien_fleming")
    runs = runs_with([0.03, 0.031, 0.029, 0.032])
    fixed = judge(claim("superiority"), runs, 0.01)
    j = measure(claim("superiority"), 0.01, runs, sequential=seq)
    assert j.p_yes > fixed.p_yes  # looking twice costs evidence


def test_seeds_needed_follow_the_noncentral_t():
    from pipeline import stats

    effects = [0.004, 0.012, -0.002, 0.01]
    j = judge(claim("superiority"), runs_with(effects), 0.01, alpha=0.05)
    assert j.verdict == "inconclusive"
    sd = float(np.std(effects, ddof=1))
    assert j.seeds_needed == stats.seeds_needed(float(np.mean(effects)), sd, 0.05 / 2)


def test_every_claim_names_its_source_and_has_a_valid_margin_in_params():
    cfg = config()
    for m in methods.in_pipeline(cfg):
        for c in m.claims():
            assert c.paper and c.where and c.statement and c.effect_label
            assert c.validate_margin(cfg.claims[m.name][c.name]) is None
            assert c.control is None or methods.get(c.control).control_of == m.name


def test_like_with_like_every_default_claim_compares_sides_at_its_operating_point():
    cfg = config()
    for m in methods.in_pipeline(cfg):
        for c in m.claims():
            assert mismatch(c, cfg) is None, c.id
    searched = cfg.model_copy(update={"transfer": cfg.transfer.model_copy(update={"use_searched": True})})
    sd = next(c for c in methods.get("sdconv").claims() if c.name == "transfer_vs_dynet")
    assert "searched" in mismatch(sd, searched)
    rows = judge_all(searched, [{}])
    assert any(j.claim is not None and j.verdict.startswith("not comparable (transfer@sdconv") for j in rows)


def test_a_seed_study_runs_the_stages_its_verdicts_read():
    """The study's default targets: the stages the claims' effects read, nothing the verdicts ignore."""
    from stages.study import verdict_stages

    cfg = config()
    pipeline = ["validate", "prepare", "pretrain", *[f"convert@{m}" for m in cfg.convert],
                *[f"control@{c}" for c in cfg.controls], "control@unlisted", *[f"search@{m}" for m in cfg.search.methods],
                "transfer@dense", "transfer@dynet", "transfer@sdconv", "latency", "report"]
    chosen = verdict_stages(cfg, pipeline)
    assert chosen == [s for s in pipeline if s in chosen]  # pipeline order
    assert {"pretrain", "latency", "transfer@dynet", "transfer@sdconv"} <= set(chosen)
    assert {f"convert@{m}" for m in cfg.convert} | {f"control@{c}" for c in cfg.controls} <= set(chosen)
    assert not {"validate", "prepare", "report", "transfer@dense", "control@unlisted"} & set(chosen)
    assert not any(s.startswith("search@") for s in chosen)


def test_stages_read_follows_each_claims_effect():
    c = Claim("m", "x", "paper", "abstract", "s", "label", "superiority",
              difference(("convert@m", "test_acc"), ("control@c", "test_acc")),
              comparable=lambda r: r["pretrain"]["width"] == 1)
    assert stages_read([c]) == {"convert@m", "control@c", "pretrain"}
    assert stages_read([claim("ratio_at_most", ratio(("a", "x"), ("b", "y")))]) == {"a", "b"}


@pytest.mark.parametrize("name, bad", [("budget", -0.05), ("acc_vs_dense", 0.0), ("speedup", -1.6)])
def test_the_schema_refuses_a_margin_of_the_wrong_sign(name, bad):
    from pipeline.errors import ConfigError

    cfg = config()
    claims = {**cfg.claims, "dynconv": {**cfg.claims["dynconv"], name: bad}}
    with pytest.raises(ConfigError, match=rf"'claims.dynconv.{name}': .* must be positive, got {bad}"):
        methods.validate(cfg.model_copy(update={"claims": claims}))
