"""Verdicts on constructed numbers: the paired CI by hand, all three outcomes, single seeds, missing runs."""

from __future__ import annotations

import math

import pytest

from pipeline import methods
from pipeline.claims import Claim, confidence_interval, decide, difference, judge, stages_read

from .conftest import config

# Three seeds: method and dense test accuracy of the same seed are paired.
RUNS = [
    {"pretrain": {"test_acc": 0.91}, "convert@m": {"test_acc": 0.90}},
    {"pretrain": {"test_acc": 0.92}, "convert@m": {"test_acc": 0.92}},
    {"pretrain": {"test_acc": 0.93}, "convert@m": {"test_acc": 0.91}},
]
# By hand: differences -0.01, 0.00, -0.02; mean -0.01; sd = sqrt((0 + 1e-4 + 1e-4) / 2) = 0.01;
# t(0.975, 2 df) = 4.302653; half width = 4.302653 * 0.01 / sqrt(3) = 0.0248414.
LOW, HIGH = -0.01 - 0.0248414, -0.01 + 0.0248414


def acc_claim(compare="at_least") -> Claim:
    return Claim("m", "acc", "A paper", "Table 1", "No accuracy loss.", "test accuracy, method minus dense", compare,
                 lambda r: difference(r, ("convert@m", "test_acc"), ("pretrain", "test_acc")), "dense", 100, " points")


def test_paired_confidence_interval_by_hand():
    j = judge(acc_claim(), RUNS, -0.05)
    assert j.values == pytest.approx((-0.01, 0.0, -0.02))
    assert (j.mean, j.low, j.high) == pytest.approx((-0.01, LOW, HIGH), abs=1e-6)
    assert j.n == 3 and not j.single_seed
    assert j.shown() == "-1points [95 % CI -3.48, +1.48] (n = 3)".replace("-1points", "-1 points")


@pytest.mark.parametrize("bound, verdict", [(-0.05, "reproduced"), (-0.02, "inconclusive"), (0.02, "not reproduced")])
def test_at_least(bound, verdict):
    assert judge(acc_claim(), RUNS, bound).verdict == verdict


@pytest.mark.parametrize("bound, verdict", [(0.02, "reproduced"), (-0.01, "inconclusive"), (-0.04, "not reproduced")])
def test_at_most(bound, verdict):
    assert judge(acc_claim("at_most"), RUNS, bound).verdict == verdict


@pytest.mark.parametrize("bound, verdict", [(0.04, "reproduced"), (0.02, "inconclusive")])
def test_within(bound, verdict):
    assert judge(acc_claim("within"), RUNS, bound).verdict == verdict


def test_within_not_reproduced_when_the_interval_lies_outside():
    shifted = [{"pretrain": {"test_acc": 0.5}, "convert@m": {"test_acc": 0.5 + d}} for d in (0.10, 0.11, 0.12)]
    assert judge(acc_claim("within"), shifted, 0.05).verdict == "not reproduced"


def test_decide_edges_are_inclusive():
    assert decide("at_least", 0.0, 1.0, 0.0) == "reproduced"
    assert decide("at_most", -1.0, 0.0, 0.0) == "reproduced"
    assert decide("within", -0.05, 0.05, 0.05) == "reproduced"


def test_single_seed_is_labelled_and_judged_on_the_point():
    j = judge(acc_claim(), RUNS[:1], -0.05)
    assert j.single_seed and (j.low, j.high) == (j.mean, j.mean)
    assert j.shown() == "-1 points (single seed)" and j.shown_verdict() == "reproduced (single seed)"


def test_a_claim_without_its_runs_is_not_run():
    j = judge(acc_claim(), [{"pretrain": {"test_acc": 0.9}}], 0.0)
    assert j.verdict == "not run" and j.shown() == "not measured"


def test_a_claim_that_does_not_apply_says_so():
    claim = Claim("m", "acc", "P", "T", "S.", "e", "at_least", lambda r: 0.0, comparable=lambda r: False,
                  condition="at width 1")
    assert judge(claim, RUNS, 0.0).verdict == "not comparable (at width 1)"


def test_student_t_against_known_quantiles():
    mean, low, high = confidence_interval([1.0, 2.0])  # sd 0.7071, t(0.975, 1) = 12.7062
    assert (low, high) == pytest.approx((1.5 - 12.7062 * 0.5, 1.5 + 12.7062 * 0.5), abs=1e-3)
    assert confidence_interval([3.0]) == (3.0, 3.0, 3.0)


def test_every_claim_names_its_source_and_has_a_bound_in_params():
    cfg = config()
    for m in methods.in_pipeline(cfg):
        for claim in m.claims():
            assert claim.paper and claim.where and claim.statement and claim.effect_label
            assert math.isfinite(cfg.claims[m.name][claim.name])
            assert claim.control is None or methods.get(claim.control).control_of == m.name


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
    claim = Claim("m", "x", "paper", "abstract", "s", "label", "at_least",
                  lambda r: difference(r, ("convert@m", "test_acc"), ("control@c", "test_acc")),
                  comparable=lambda r: r["pretrain"]["width"] == 1)
    assert stages_read([claim]) == {"convert@m", "control@c", "pretrain"}
