"""Search workers on PostgreSQL outlive a restart of the database, between trials and during one: they
reconnect, their heartbeats resume, and the study still ends with exactly n_trials complete trials, none
lost and no configuration run twice except a reclaimed one. A database that stays away longer than
``optuna.reconnect_timeout`` stops each worker with one line naming the storage without its password.

Each case runs tests/search_worker.py processes against the session's throwaway server
(tests/pg_server.py), restarts or stops that server with its own pg_ctl, and starts it again if a case
left it stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.search.storage import REQUEUED_ATTR, make_storage

WORKER = Path(__file__).with_name("search_worker.py")
REPO = WORKER.parent.parent
HEARTBEAT = 1
optuna.logging.set_verbosity(optuna.logging.WARNING)


class Workers:
    """Worker processes of one study, their stdout and stderr in files; killed if a case fails midway."""

    def __init__(self, url: str, name: str, n: int, folder: Path, grace: int, reconnect: float):
        self.url, self.name, self.n, self.folder = url, name, n, folder
        self.grace, self.reconnect = grace, reconnect
        self.procs: list[subprocess.Popen] = []
        self.outs: list[Path] = []

    def spawn(self, pause: float, seed: int, reconnect: float | None = None) -> subprocess.Popen:
        out = self.folder / f"w{len(self.procs)}.json"
        cmd = [sys.executable, str(WORKER), self.url, self.name, str(self.n), str(pause), str(seed), str(out),
               str(HEARTBEAT), str(self.grace), str(self.reconnect if reconnect is None else reconnect)]
        with open(out.with_suffix(".out"), "w") as stdout, open(out.with_suffix(".err"), "w") as stderr:
            proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=stdout, stderr=stderr)
        self.procs.append(proc)
        self.outs.append(out)
        return proc

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]

    def report(self, i: int) -> dict:
        return json.loads(self.outs[i].read_text())

    def stdout(self, i: int) -> str:
        return self.outs[i].with_suffix(".out").read_text()

    def stderr(self, i: int) -> str:
        return self.outs[i].with_suffix(".err").read_text()

    def kill_left(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


@pytest.fixture
def db(postgres, request):
    """A role and database of its own for one case; the server is started again if the case stopped it."""
    tag = request.node.name.removeprefix("test_")[:20].replace("-", "_")
    password = f"pw-{tag}"
    postgres.add_role(f"r_{tag}", password, f"d_{tag}")
    yield postgres, postgres.url(f"r_{tag}", password, f"d_{tag}"), f"d_{tag}", password
    if not postgres.is_up():
        postgres.start()


def open_study(url: str, grace: int):
    storage = make_storage(url, "test", HEARTBEAT, grace, reconnect_timeout=30)
    return optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"],
                               load_if_exists=True)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def in_objective(study, k: int) -> list:
    """The running trials that sampled both params (their workers sleep in the objective), if at least k."""
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if len(t.params) == 2]
    return running if len(running) >= k else []


def server_now(server, database: str) -> str:
    return server.sql("SELECT localtimestamp", database).strip()


def beats_after(server, database: str, trial_ids: list[int], since: str) -> int:
    """Heartbeats of these trials recorded after ``since`` (the server's clock, as Optuna records them)."""
    ids = ",".join(str(i) for i in trial_ids)
    return int(server.sql(f"SELECT count(*) FROM trial_heartbeats WHERE trial_id IN ({ids}) "
                          f"AND heartbeat > '{since}'::timestamp", database))


def restart_and_finish(server, database: str, workers: Workers) -> str:
    """``pg_ctl restart`` under the running workers, then wait for both to end well; the server's clock
    right after the restart."""
    server.restart()
    restarted = server_now(server, database)
    assert workers.wait(60) == [0, 0], workers.stderr(0) + workers.stderr(1)
    return restarted


def check_complete(study, n: int) -> list:
    """Exactly n COMPLETE trials; configurations distinct except a rerun of a reclaimed trial, once each."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n, Counter(t.state.name for t in trials)
    fresh = [tuple(sorted(t.params.items())) for t in complete if REQUEUED_ATTR not in t.user_attrs]
    assert len(set(fresh)) == len(fresh), "a configuration ran twice"
    reruns = Counter(t.user_attrs[REQUEUED_ATTR] for t in complete if REQUEUED_ATTR in t.user_attrs)
    assert all(count == 1 for count in reruns.values()), reruns
    for t in complete:
        if REQUEUED_ATTR in t.user_attrs:
            source = trials[t.user_attrs[REQUEUED_ATTR]]  # the reclaimed trial: its sampled params run again
            assert source.state == TrialState.FAIL
            assert all(t.params[k] == v for k, v in source.params.items())
    return complete


def test_restart_between_trials(db, tmp_path):
    """Instant objectives: the workers spend their time asking and telling when the server restarts."""
    server, url, database, _ = db
    n = 40
    study = open_study(url, grace=5)
    workers = Workers(url, "s", n, tmp_path, grace=5, reconnect=30)
    try:
        for seed in (1, 2):
            workers.spawn(pause=0.0, seed=seed)
        wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) >= 4,
                 60, "4 complete trials")
        restarted = restart_and_finish(server, database, workers)
    finally:
        workers.kill_left()
    complete = check_complete(study, n)
    told = sorted(k for i in range(2) for k in workers.report(i)["ran"])
    assert told == sorted(t.number for t in complete)  # each complete trial told by one worker, none lost
    assert any("unreachable" in workers.stdout(i) for i in range(2)), "the restart must have hit a worker"
    assert beats_after(server, database, [t._trial_id for t in complete], restarted) > 0


def test_restart_during_a_trial(db, tmp_path):
    """Worker B's trial runs across the restart and past the grace period after it, while worker A, done,
    waits and checks for stale trials: B's heartbeats resume, so nobody reclaims it, and B tells it."""
    server, url, database, _ = db
    n, pause, grace = 2, 5.0, 3
    study = open_study(url, grace)
    workers = Workers(url, "s", n, tmp_path, grace=grace, reconnect=30)
    try:
        workers.spawn(pause=pause, seed=1)
        wait_for(lambda: in_objective(study, 1), 60, "worker A inside its objective")
        workers.spawn(pause=pause, seed=2)
        wait_for(lambda: in_objective(study, 2), 60, "worker B inside its objective")
        spanning = [t.number for t in in_objective(study, 2)]
        restarted = restart_and_finish(server, database, workers)
    finally:
        workers.kill_left()
    complete = check_complete(study, n)
    assert sorted(t.number for t in complete) == sorted(spanning)  # told by their own workers
    assert all(REQUEUED_ATTR not in t.user_attrs for t in complete)
    assert [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.COMPLETE] == []
    assert [workers.report(i)["reclaimed"] for i in range(2)] == [[], []]
    assert sorted(k for i in range(2) for k in workers.report(i)["ran"]) == sorted(spanning)
    assert beats_after(server, database, [t._trial_id for t in complete], restarted) >= 2


def test_database_away_longer_than_the_bound_stops_each_worker_with_one_line(db, tmp_path):
    server, url, database, password = db
    n, reconnect, pause, grace = 3, 3, 1.5, 2
    study = open_study(url, grace)
    workers = Workers(url, "s", n, tmp_path, grace=grace, reconnect=reconnect)
    try:
        for seed in (1, 2):
            workers.spawn(pause=pause, seed=seed)
        wait_for(lambda: in_objective(study, 2), 60, "both workers inside their objectives")
        stopped = time.monotonic()
        server.stop()
        codes = workers.wait(pause + reconnect + 20)
        waited = time.monotonic() - stopped
        server.start()
        assert codes == [2, 2]
        assert reconnect <= waited < pause + reconnect + 15
        shown = f"postgresql://127.0.0.1:{server.port}/{database}"
        for i in range(2):
            [line] = workers.stderr(i).strip().splitlines()
            assert line.startswith(f"search worker: error: search storage {shown} unreachable for "), line
            assert f"(optuna.reconnect_timeout: {reconnect} s)" in line
            assert password not in workers.stdout(i) + workers.stderr(i)

        # Back: a new worker reclaims the stopped workers' trials after the grace period and finishes the study.
        late = workers.spawn(pause=0.1, seed=3, reconnect=30)
        assert late.wait(timeout=60) == 0, workers.stderr(2)
    finally:
        workers.kill_left()
    check_complete(study, n)
    assert len(workers.report(2)["reclaimed"]) == 2
