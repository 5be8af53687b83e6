"""Optuna machinery: parallel workers on one journal, resume after SIGKILL, seeded
reproducibility, the Pareto front and the selection rule."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from pydantic import TypeAdapter

from pipeline import methods
from pipeline.config import ConfigError, SamplerCfg
from pipeline.search.storage import REQUEUED_ATTR, make_sampler, pareto_trials, run_worker, select_trial

from .conftest import config

WORKER = Path(__file__).with_name("search_worker.py")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def load(journal: Path, name: str):
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=name, storage=storage)


def spawn(journal: Path, name: str, n: int, pause: float, seed: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(journal), name, str(n), str(pause), str(seed), str(out)])


def test_two_workers_complete_exactly_n_trials(tmp_path):
    journal, n = tmp_path / "j.log", 12
    outs = [tmp_path / "w0.json", tmp_path / "w1.json"]
    procs = [spawn(journal, "s", n, 0.15, seed, out) for seed, out in zip((1, 2), outs)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    study = load(journal, "s")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == n and len(states) == n  # none lost, no extra
    ran = [json.loads(o.read_text())["ran"] for o in outs]
    assert all(ran), "both workers must have run trials for the test to mean anything"
    assert sorted(ran[0] + ran[1]) == list(range(n))  # each trial told by exactly one worker
    params = {(t.params["x"], t.params["y"]) for t in study.trials}
    assert len(params) == n  # the workers did not replay the same suggestions


def test_killed_worker_resumes_to_n_trials(tmp_path):
    journal, n = tmp_path / "j.log", 6
    proc = spawn(journal, "s", n, 0.6, 1, tmp_path / "first.json")
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = load(journal, "s").trials
        except KeyError:  # the worker has not created the study yet
            continue
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        if done >= 2 and trials[-1].state == TrialState.RUNNING and trials[-1].params:
            break  # kill inside the objective, after sampling
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    before = load(journal, "s").trials
    running = [t for t in before if t.state == TrialState.RUNNING]
    assert len(running) == 1 and running[0].params, "the kill must hit a sampled, running trial"
    done_before = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}

    rerun = spawn(journal, "s", n, 0.05, 1, tmp_path / "second.json")
    assert rerun.wait(timeout=60) == 0
    study = load(journal, "s")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n
    assert all(study.trials[k].values == v for k, v in done_before.items())  # earlier trials kept as they were
    stale = study.trials[running[0].number]
    assert stale.state == TrialState.FAIL
    requeued = [t for t in complete if t.user_attrs.get(REQUEUED_ATTR) == stale.number]
    assert len(requeued) == 1 and requeued[0].params == running[0].params  # the killed configuration ran again
    assert json.loads((tmp_path / "second.json").read_text())["reclaimed"] == [stale.number]


def run_sequential(journal: Path, seed: int, n: int = 8) -> list[tuple]:
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"],
                                sampler=make_sampler(sampler_cfg("tpe"), seed))
    run_worker(study, lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n, journal.with_suffix(".lock"))
    return [(t.params["x"], t.params["y"], tuple(t.values)) for t in study.trials]


def test_same_seed_fresh_store_same_trials(tmp_path):
    a = run_sequential(tmp_path / "a.log", seed=3)
    b = run_sequential(tmp_path / "b.log", seed=3)
    c = run_sequential(tmp_path / "c.log", seed=4)
    assert a == b
    assert a != c


def sampler_cfg(name: str):
    keys = {"tpe": {"n_startup_trials": 3, "multivariate": True, "constant_liar": True, "group": False,
                    "n_ei_candidates": 24}, "nsga2": {"population_size": 8}, "random": {}}[name]
    return TypeAdapter(SamplerCfg).validate_python({"name": name, **keys})


@pytest.mark.parametrize("name", ["tpe", "nsga2", "random"])
def test_samplers_are_seeded(name):
    cfg = sampler_cfg(name)
    assert make_sampler(cfg, 5)._rng.rng.random() == make_sampler(cfg, 5)._rng.rng.random()


def test_failing_objective_marks_fail_then_stops(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])

    def boom(trial):
        raise RuntimeError("broken objective")

    with pytest.raises(RuntimeError, match="broken objective"):
        run_worker(study, boom, 5, tmp_path / "lock")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3


def test_timeout_stops_asking(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    report = run_worker(study, lambda t: (time.sleep(0.05), (0.0, 0.0))[1], 1000, tmp_path / "lock", timeout=0.2)
    assert report.stopped_by == "timeout" and 1 <= len(study.trials) < 20


def fixed_trials(values: list[tuple[float, float]]):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for v in values:
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=list(v)))
    return study


def test_pareto_and_selection_rule():
    # (val acc, MACs): 0 and 1 dominated by 2; 2, 3, 4 on the front.
    study = fixed_trials([(0.80, 5.0), (0.90, 9.0), (0.95, 4.0), (0.949, 2.0), (0.90, 1.0)])
    front = pareto_trials(study)
    assert [t.number for t in front] == [2, 3, 4]
    assert select_trial(front, 1, within=0.005).number == 3  # within 0.5 points of 0.95: the cheaper one
    assert select_trial(front, 1, within=0.0).number == 2  # only the best accuracy qualifies
    assert select_trial(front, 1, within=0.1).number == 4
    with pytest.raises(ValueError):
        select_trial([], 1, 0.01)


def test_search_params_are_validated():
    with pytest.raises(ConfigError, match=r"search\.dynconv\.space.*budget"):
        methods.validate(config({"search": {"dynconv": {"space": {"budget": {"low": 0.0, "high": 0.5}}}}}))
    with pytest.raises(ConfigError, match="low must be <= high"):
        methods.validate(config({"search": {"sdconv": {"space": {"reg_weight": {"low": 1.0, "high": 0.1}}}}}))
    with pytest.raises(ConfigError, match=r"'optuna.storage': expected an RDB URL .* \(got 'optuna.db'\)$"):
        config({"optuna": {"storage": "optuna.db"}})
