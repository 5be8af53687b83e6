"""Optuna study machinery shared by the searches: storage, sampler, workers,
Pareto front and the selection rule.

- Storage: a journal file ``<repo>/optuna/<method>/journal.log`` (absolute,
  derived from the repository root, so ``dvc exp`` temporary copies use the
  same study), or an RDB URL for shared use: ``$OPTUNA_STORAGE`` when set,
  else ``optuna.storage`` (without a password; PostgreSQL's client reads it
  from ``PGPASSWORD`` or ``~/.pgpass``). SQLite is not offered for parallel
  workers: it answers "database is locked". The URL is shown without its
  user-info part wherever it is logged.
- Study name = method + a hash of everything a trial's result depends on
  (search params, seed, model params, the converted checkpoint), so a changed
  param starts a new study in the same store instead of mixing trials.
- Workers (:func:`run_worker`) ask for trials while fewer than ``n_trials``
  are complete or running, and wait (reclaiming dead workers' trials) until
  ``n_trials`` are complete. Counting, reclaiming and asking happen under one
  lock (:func:`worker_lock`), so workers never overshoot: for an RDB storage a
  database lock (PostgreSQL ``pg_advisory_lock``, MySQL ``GET_LOCK``) held on its
  own connection, which workers on any host share and the database releases
  when the holder dies; for the journal file an fcntl lock (one host).
- A dead worker's trial (state RUNNING forever) is reclaimed: marked FAIL and
  its parameters queued again, so the study ends with exactly ``n_trials``
  complete trials. With an RDB storage every running trial records a heartbeat
  every ``optuna.heartbeat_interval`` seconds (Optuna's heartbeat table); a trial
  without one for ``optuna.grace_period`` seconds is stale, whichever host ran
  it. With the journal file a trial is stale when its worker's pid is gone
  from this host.
- Sampler: passed explicitly with every argument and seeded (Optuna 5
  changed the defaults: TPE is multivariate with constant liar and is the
  default multi-objective sampler). A sequential search with the same seed
  and params on a fresh store suggests the same trials.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import SamplerCfg
from pipeline.errors import UserError
from pipeline.paths import repo_root
from pipeline.redact import redact

# Heartbeats with ask/tell are deliberate (Optuna documents them for optimize()): not news at every ask.
warnings.filterwarnings("ignore", message=".*heartbeat_interval.*experimental", category=Warning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

STORAGE_ENV = "OPTUNA_STORAGE"  # an RDB URL, password included if need be; wins over optuna.storage

HOST_ATTR, PID_ATTR, REQUEUED_ATTR = "worker_host", "worker_pid", "requeued_from"
MAX_CONSECUTIVE_FAILURES = 3


def store_dir(method: str) -> Path:
    return repo_root() / "optuna" / method


def storage_url(configured: str | None) -> str | None:
    """The RDB URL of the studies: ``$OPTUNA_STORAGE`` when set, else ``optuna.storage`` (None: journal files)."""
    return os.environ.get(STORAGE_ENV) or configured


def make_storage(url: str | None, method: str, heartbeat_interval: int = 10, grace_period: int = 60):
    """Journal file under ``store_dir(method)`` when ``url`` is None, else an RDB storage at ``url`` whose
    running trials record heartbeats every ``heartbeat_interval`` s and are stale after ``grace_period`` s."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is not None:
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        except Exception as err:  # noqa: BLE001 - driver and connection errors: one line, no credentials
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"search storage {redact(url)} cannot be opened: {redact(first)}") from None
    path = store_dir(method) / "journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def describe_storage(url: str | None, method: str) -> str:
    if url is None:
        return f"journal file {store_dir(method) / 'journal.log'}"
    return redact(url)


def make_sampler(cfg: SamplerCfg, seed: int):
    import optuna

    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=cfg.n_startup_trials, multivariate=cfg.multivariate,
            constant_liar=cfg.constant_liar, group=cfg.group, n_ei_candidates=cfg.n_ei_candidates,
        )  # fmt: skip
    if cfg.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.population_size)
    return optuna.samplers.RandomSampler(seed=seed)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing); released when the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_rdb(storage) -> bool:
    return getattr(storage, "engine", None) is not None


def _backend(study):
    """The study's storage itself (Optuna wraps an RDB storage in a caching layer)."""
    return getattr(study._storage, "_backend", study._storage)


@contextmanager
def worker_lock(study, lock_path: Path) -> Iterator[None]:
    """Mutual exclusion of the workers of one study while they count, reclaim and ask.

    RDB storage: a database lock on its own connection, keyed by the study name
    (PostgreSQL ``pg_advisory_lock``, MySQL ``GET_LOCK``): shared by workers on
    every host, released by the database when the holder's connection dies.
    Journal file: an fcntl lock on ``lock_path`` (one host).
    """
    storage = _backend(study)
    if not _is_rdb(storage):
        with file_lock(lock_path):
            yield
        return
    from sqlalchemy import text

    engine = storage.engine
    key = int.from_bytes(hashlib.sha256(study.study_name.encode()).digest()[:8], "big", signed=True)
    if engine.dialect.name == "postgresql":
        take, give = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"
    elif engine.dialect.name in ("mysql", "mariadb"):
        take, give, key = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", f"optuna-{key}"
    else:
        raise UserError(f"parallel search workers need PostgreSQL or MySQL, not {engine.dialect.name}")
    with engine.connect() as conn:
        conn.execute(text(take), {"k": key})
        try:
            yield
        finally:
            conn.execute(text(give), {"k": key})


class Heartbeat:
    """Records the trial's heartbeat every ``heartbeat_interval`` s while it runs (RDB storages; for the
    journal file nothing). Optuna's heartbeat thread serves ``optimize()`` only; workers ask and tell."""

    def __init__(self, study, trial):
        self.storage, self.trial_id = _backend(study), trial._trial_id
        interval = self.storage.get_heartbeat_interval() if _is_rdb(self.storage) else None
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True) if interval else None

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed beat only risks a reclaim after the grace period
                pass

    def __enter__(self):
        if self.thread:
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()


def _stale_trials(study) -> list:
    """RUNNING trials whose worker is gone: no heartbeat for the grace period (RDB), or a dead pid on this host
    (journal; trials of other hosts cannot be checked from here)."""
    from optuna.trial import TrialState

    storage = _backend(study)
    if _is_rdb(storage):
        stale = set(storage._get_stale_trial_ids(study._study_id))
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id in stale]
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(HOST_ATTR) == host and t.user_attrs.get(PID_ATTR) is not None
            and not _alive(int(t.user_attrs[PID_ATTR]))]


def reclaim_stale(study) -> list[int]:
    """Mark RUNNING trials of dead workers as FAIL and queue their params again; returns their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    reclaimed = []
    for t in _stale_trials(study):
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # its worker told it after all
            continue
        if t.params:  # killed after sampling: run that configuration again (else a fresh trial replaces it)
            study.enqueue_trial(t.params, user_attrs={REQUEUED_ATTR: t.number}, skip_if_exists=False)
        reclaimed.append(t.number)
    return reclaimed


def count_trials(study) -> dict[str, int]:
    from optuna.trial import TrialState

    counts = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    return counts


@dataclass
class WorkerReport:
    ran: list[int]
    failed: list[int]
    reclaimed: list[int]
    stopped_by: str  # "n_trials" | "timeout" | "failures"


def run_worker(
    study,
    objective: Callable[[Any], Sequence[float]],
    n_trials: int,
    lock_path: Path,
    timeout: float | None = None,
    on_start: Callable[[Any], None] | None = None,
    on_end: Callable[[Any, str, Sequence[float] | None, float], None] | None = None,
    poll: float = 1.0,
) -> WorkerReport:
    """Ask, evaluate and tell trials until ``n_trials`` are complete, or ``timeout`` seconds passed.

    While the other workers' running trials would complete the study, wait
    (``poll`` seconds) and reclaim the trials of dead workers, so the study
    finishes even when a worker dies last. ``on_start(trial)`` runs after the
    trial is created, ``on_end(trial, state, values, seconds)`` after it is told.
    An objective that raises marks its trial FAIL; after
    ``MAX_CONSECUTIVE_FAILURES`` in a row the worker re-raises. Interrupting
    (Ctrl-C) marks the running trial FAIL before re-raising.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    start = time.monotonic()
    ran: list[int] = []
    failed: list[int] = []
    reclaimed: list[int] = []
    streak = 0
    while True:
        trial = None
        with worker_lock(study, lock_path):
            reclaimed += reclaim_stale(study)
            counts = count_trials(study)
            if counts["complete"] >= n_trials:
                return WorkerReport(ran, failed, reclaimed, "n_trials")
            if timeout is not None and time.monotonic() - start >= timeout:
                return WorkerReport(ran, failed, reclaimed, "timeout")
            if counts["complete"] + counts["running"] < n_trials:
                trial = study.ask()
                trial.set_user_attr(HOST_ATTR, socket.gethostname())
                trial.set_user_attr(PID_ATTR, os.getpid())
        if trial is None:
            time.sleep(poll)
            continue
        if on_start:
            on_start(trial)
        t0 = time.perf_counter()
        try:
            with Heartbeat(study, trial):
                values = [float(v) for v in objective(trial)]
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            if on_end:
                on_end(trial, "FAIL", None, time.perf_counter() - t0)
            raise
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            failed.append(trial.number)
            if on_end:
                on_end(trial, "FAIL", None, time.perf_counter() - t0)
            streak += 1
            if streak >= MAX_CONSECUTIVE_FAILURES:
                raise
            continue
        streak = 0
        try:
            study.tell(trial, values)
        except UpdateFinishedTrialError:  # reclaimed as stale meanwhile (no heartbeat for the grace period)
            if on_end:
                on_end(trial, "FAIL", None, time.perf_counter() - t0)
            continue
        ran.append(trial.number)
        if on_end:
            on_end(trial, "COMPLETE", values, time.perf_counter() - t0)


def pareto_trials(study) -> list:
    """Pareto-optimal complete trials, by trial number."""
    return sorted(study.best_trials, key=lambda t: t.number)


def select_trial(trials: Sequence, cost_index: int, within: float):
    """The documented choice: among the given (Pareto) trials whose objective 0
    (validation accuracy, maximised) is within ``within`` of the best, the one
    with the lowest objective ``cost_index``; ties go to higher accuracy, then
    the lower trial number."""
    if not trials:
        raise ValueError("no complete trial to choose from")
    best = max(t.values[0] for t in trials)
    close = [t for t in trials if t.values[0] >= best - within - 1e-12]
    return min(close, key=lambda t: (t.values[cost_index], -t.values[0], t.number))
