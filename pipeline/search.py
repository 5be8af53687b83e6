"""Optuna study machinery shared by the searches: storage, sampler, workers,
Pareto front and the selection rule.

- Storage: a journal file ``<repo>/optuna/<method>/journal.log`` (absolute,
  derived from the repository root, so ``dvc exp`` temporary copies use the
  same study), or an RDB URL for shared use: ``$OPTUNA_STORAGE`` when set,
  else ``search.storage`` (without a password; PostgreSQL's client reads it
  from ``PGPASSWORD`` or ``~/.pgpass``). SQLite is not offered for parallel
  workers: it answers "database is locked". The URL is shown without its
  user-info part wherever it is logged.
- Study name = method + a hash of everything a trial's result depends on
  (search params, seed, model params, the converted checkpoint), so a changed
  param starts a new study in the same store instead of mixing trials.
- Workers (:func:`run_worker`) stop when the study has ``n_trials`` trials
  complete or running. Counting and asking happen under one file lock, so two
  workers on one store never overshoot; the lock also serialises the
  reclaiming of trials whose worker process died (state RUNNING forever):
  they are marked FAIL and their parameters queued again, so a killed search
  resumes where it was and ends with exactly ``n_trials`` complete trials.
- Sampler: passed explicitly with every argument and seeded (Optuna 5
  changed the defaults: TPE is multivariate with constant liar and is the
  default multi-objective sampler). A sequential search with the same seed
  and params on a fresh store suggests the same trials.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import SamplerCfg
from pipeline.errors import UserError
from pipeline.paths import repo_root
from pipeline.redact import redact

STORAGE_ENV = "OPTUNA_STORAGE"  # an RDB URL, password included if need be; wins over search.storage

HOST_ATTR, PID_ATTR, REQUEUED_ATTR = "worker_host", "worker_pid", "requeued_from"
MAX_CONSECUTIVE_FAILURES = 3


def store_dir(method: str) -> Path:
    return repo_root() / "optuna" / method


def storage_url(configured: str | None) -> str | None:
    """The RDB URL of the studies: ``$OPTUNA_STORAGE`` when set, else ``search.storage`` (None: journal files)."""
    return os.environ.get(STORAGE_ENV) or configured


def make_storage(url: str | None, method: str):
    """Journal file under ``store_dir(method)`` when ``url`` is None, else an RDB storage at ``url``."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is not None:
        try:
            return optuna.storages.RDBStorage(url)
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


def reclaim_stale(study) -> list[int]:
    """Mark RUNNING trials of dead workers on this host as FAIL and queue their params again.

    Returns the numbers of the reclaimed trials. Trials of workers on other
    hosts are left alone (their liveness cannot be checked from here).
    """
    from optuna.trial import TrialState

    host = socket.gethostname()
    reclaimed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get(PID_ATTR)
        if t.user_attrs.get(HOST_ATTR) != host or pid is None or _alive(int(pid)):
            continue
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
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
) -> WorkerReport:
    """Ask, evaluate and tell trials until ``n_trials`` are complete or running, or ``timeout`` seconds passed.

    ``on_start(trial)`` runs after the trial is created, ``on_end(trial, state,
    values, seconds)`` after it is told. An objective that raises marks its
    trial FAIL; after ``MAX_CONSECUTIVE_FAILURES`` in a row the worker re-raises.
    Interrupting (Ctrl-C) marks the running trial FAIL before re-raising.
    """
    from optuna.trial import TrialState

    start = time.monotonic()
    ran: list[int] = []
    failed: list[int] = []
    reclaimed: list[int] = []
    streak = 0
    while True:
        with file_lock(lock_path):
            reclaimed += reclaim_stale(study)
            counts = count_trials(study)
            if counts["complete"] + counts["running"] >= n_trials:
                return WorkerReport(ran, failed, reclaimed, "n_trials")
            if timeout is not None and time.monotonic() - start >= timeout:
                return WorkerReport(ran, failed, reclaimed, "timeout")
            trial = study.ask()
            trial.set_user_attr(HOST_ATTR, socket.gethostname())
            trial.set_user_attr(PID_ATTR, os.getpid())
        if on_start:
            on_start(trial)
        t0 = time.perf_counter()
        try:
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
        study.tell(trial, values)
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
