"""Search workers on several hosts share one PostgreSQL study: the database coordinates them (an advisory
lock around count-and-ask, heartbeats stored with the trials), so a worker that dies on another host has
its trial reclaimed by the others within the grace period, and the study ends with exactly n_trials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.search.storage import REQUEUED_ATTR, make_storage

WORKER = Path(__file__).with_name("search_worker.py")
N, PAUSE, HEARTBEAT, GRACE = 10, 1.5, 1, 4
OTHER_HOST = "other-host"


def can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--uts", "true"], capture_output=True).returncode == 0


def spawn(url: str, seed: int, out: Path, host: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), url, "s", str(N), str(PAUSE), str(seed), str(out), str(HEARTBEAT), str(GRACE)]
    if host:  # its own UTS namespace: the worker reports another host name, so a pid check cannot see it
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    return subprocess.Popen(cmd, env=env)


@pytest.mark.skipif(not can_unshare(), reason="needs `unshare --uts` (root in a Linux namespace-capable sandbox)")
def test_workers_on_two_hosts_finish_exactly_n_trials_after_one_is_killed(postgres, tmp_path):
    postgres.add_role("search", "pw-hosts", "optuna_hosts")
    url = postgres.url("search", "pw-hosts", "optuna_hosts")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=make_storage(url, "test", HEARTBEAT, GRACE), study_name="s",
                        directions=["maximize", "minimize"])
    t0 = time.monotonic()
    outs = [tmp_path / f"w{i}.json" for i in range(3)]
    local = [spawn(url, 1, outs[0]), spawn(url, 2, outs[1])]
    remote = spawn(url, 3, outs[2], host=OTHER_HOST)

    study = optuna.load_study(study_name="s", storage=make_storage(url, "test", HEARTBEAT, GRACE))
    deadline = time.monotonic() + 60
    victim = None
    while time.monotonic() < deadline and victim is None:
        time.sleep(0.1)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        victim = next((t for t in running if t.user_attrs.get("worker_host") == OTHER_HOST and len(t.params) == 2),
                      None)  # both params sampled: the worker is inside the objective
    assert victim is not None, "the worker on the other host never ran a trial"
    remote.send_signal(signal.SIGKILL)  # mid-trial: sampled, sleeping in the objective
    remote.wait(timeout=10)
    killed_at = time.monotonic()
    assert [p.wait(timeout=120) for p in local] == [0, 0]
    elapsed = time.monotonic() - t0

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N  # exactly n_trials, no overshoot
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    reruns = [t for t in complete if t.user_attrs.get(REQUEUED_ATTR) == victim.number]
    assert len(reruns) == 1 and reruns[0].params == killed.params == victim.params  # the dead worker's, once
    configs = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(configs)) == N  # no other configuration ran twice
    hosts = {t.user_attrs["worker_host"] for t in trials}
    assert OTHER_HOST in hosts and len(hosts) == 2
    reclaimed = [n for o in outs[:2] for n in json.loads(o.read_text())["reclaimed"]]
    assert reclaimed == [victim.number]  # by one of the surviving workers, through the heartbeat table
    # Finished within the grace period plus the trials' time (N trials of PAUSE s on two workers, plus slack).
    assert time.monotonic() - killed_at < GRACE + N * PAUSE / 2 + 15
    print(f"3 workers, one killed on another host: {elapsed:.1f} s for {N} trials of {PAUSE} s")
