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
- Database restarts: an RDB storage checks a pooled connection before using
  it (``pool_pre_ping``) and retries every storage call (asking, telling,
  heartbeats, counting, taking the lock) while the database is away, for at
  most ``optuna.reconnect_timeout`` seconds; a trial whose evaluation ended
  meanwhile is told once the database is back, never run again. The
  advisory lock dies with its connection: a worker notices that before it
  leaves the section and takes the lock again to check its decision (a trial
  asked without the lock is given back when the study would overshoot). A
  running trial whose worker never recorded its first heartbeat (it died, or
  the database went away, between asking and that heartbeat) is reclaimed
  like a stale one. Longer away: each worker stops with one line
  (:class:`StorageUnavailable`: the URL without credentials and the wait);
  its running trial is reclaimed by the others once the database is back.
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import SamplerCfg
from pipeline.errors import UserError, first_line
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


class StorageUnavailable(UserError):
    """The search's database stayed unreachable for longer than ``optuna.reconnect_timeout``."""


def _transient(err: BaseException) -> BaseException | None:
    """The error in ``err`` or what caused it (Optuna wraps driver errors) that says the database connection
    is gone: a server that restarts, shuts down or cannot be reached, as opposed to a bad query or a
    finished trial; None if there is none."""
    from sqlalchemy import exc

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError,
                             exc.PendingRollbackError)):
            return seen
        if isinstance(seen, exc.DBAPIError) and seen.connection_invalidated:
            return seen
        seen = seen.__cause__
    return None


_retrying = threading.local()  # set while a call retries: the calls it makes do not retry on their own
_back_at = -1e9  # time.monotonic() when this process last saw the database answer again after it went away


def with_reconnect(storage, call: Callable[[], Any]) -> Any:
    """``call()``, retried while the database is unreachable, for at most ``storage.reconnect_timeout``
    seconds from the first failure; then :class:`StorageUnavailable`. A storage without that attribute
    (a journal file, an RDB storage opened elsewhere) calls once."""
    global _back_at
    limit = getattr(storage, "reconnect_timeout", None)
    if limit is None or getattr(_retrying, "active", False):
        return call()
    _retrying.active = True
    try:
        lost, delay = None, 0.25
        while True:
            try:
                result = call()
            except Exception as err:  # noqa: BLE001 - only a lost connection is retried
                cause = _transient(err)
                if cause is None:
                    raise
                now = time.monotonic()
                if lost is None:
                    lost = now
                    print(f"search storage {storage.shown_url} unreachable ({first_line(cause)}); "
                          f"retrying for up to {limit:g} s", flush=True)
                if now - lost >= limit:
                    raise StorageUnavailable(
                        f"search storage {storage.shown_url} unreachable for {now - lost:.0f} s "
                        f"(optuna.reconnect_timeout: {limit:g} s): {first_line(cause)}") from None
                time.sleep(min(delay, max(0.05, limit - (now - lost))))
                delay = min(2 * delay, 2.0)
                continue
            if lost is not None:
                _back_at = time.monotonic()
                print(f"search storage {storage.shown_url} back after {_back_at - lost:.1f} s", flush=True)
            return result
    finally:
        _retrying.active = False


# The RDB storage calls that reach the database (Optuna's caching layer calls the private ones).
_RETRIED = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies", "create_new_trial", "_create_new_trial",
    "set_trial_param", "_set_trial_param", "get_trial_param", "set_trial_state_values",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials", "get_best_trial",
    "_get_best_trial_id", "get_n_trials", "get_trial_number_from_id", "get_trial_params", "record_heartbeat",
    "_get_stale_trial_ids",
)
_reconnecting_class: type | None = None


def _reconnecting_rdb() -> type:
    """``optuna.storages.RDBStorage`` whose calls in ``_RETRIED`` go through :func:`with_reconnect`."""
    global _reconnecting_class
    if _reconnecting_class is not None:
        return _reconnecting_class
    import functools

    import optuna

    base = optuna.storages.RDBStorage

    def retried(name: str):
        method = getattr(base, name)

        @functools.wraps(method)
        def call(self, *args, **kwargs):
            return with_reconnect(self, lambda: method(self, *args, **kwargs))

        return call

    def record_heartbeat_once(self, trial_id: int) -> None:
        """One try (the heartbeat thread tries again at its next beat)."""
        base.record_heartbeat(self, trial_id)

    namespace = {name: retried(name) for name in _RETRIED}
    namespace["record_heartbeat_once"] = record_heartbeat_once
    _reconnecting_class = type("ReconnectingRDBStorage", (base,), namespace)
    return _reconnecting_class


def make_storage(url: str | None, method: str, heartbeat_interval: int = 10, grace_period: int = 60,
                 reconnect_timeout: float = 120):
    """Journal file under ``store_dir(method)`` when ``url`` is None, else an RDB storage at ``url`` whose
    running trials record heartbeats every ``heartbeat_interval`` s and are stale after ``grace_period`` s,
    and whose calls wait up to ``reconnect_timeout`` s for a database that went away (a restart). A database
    that cannot be opened at all stops at once."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is not None:
        engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a pooled connection may predate a restart
        if url.startswith(("postgresql", "postgres")):  # an unreachable host fails within this, not TCP's minutes
            engine_kwargs["connect_args"] = {"connect_timeout": max(1, min(10, int(reconnect_timeout)))}
        try:
            storage = _reconnecting_rdb()(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period)
            storage.reconnect_timeout, storage.shown_url = reconnect_timeout, redact(url)
            return storage
        except Exception as err:  # noqa: BLE001 - driver and connection errors: one line, no credentials
            raise UserError(f"search storage {redact(url)} cannot be opened: {first_line(err)}") from None
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


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextmanager
def file_lock(path: Path, wait: bool = True, holder: str | None = None) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing); released when the holder dies.
    ``wait=False``: raise :class:`LockBusy` at once when another process holds it. ``holder`` (who holds
    it, for that message) is written into the file while the lock is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            raise LockBusy(path, handle.read().strip()) from None
        try:
            if holder is not None:
                handle.seek(0)
                handle.truncate()
                handle.write(holder)
                handle.flush()
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


class LockHandle:
    """What :func:`worker_lock` yields. ``held()``: whether the lock is still held; a database lock dies with
    its connection when the server restarts, and another worker may have taken it since."""

    def __init__(self, conn=None):
        self.conn = conn

    def held(self) -> bool:
        if self.conn is None:
            return True
        from sqlalchemy import text

        try:
            self.conn.execute(text("SELECT 1"))
        except Exception as err:  # noqa: BLE001 - a lost connection is a lost lock; anything else is a bug
            if _transient(err):
                return False
            raise
        return True


@contextmanager
def worker_lock(study, lock_path: Path) -> Iterator[LockHandle]:
    """Mutual exclusion of the workers of one study while they count, reclaim and ask.

    RDB storage: a database lock on its own connection, keyed by the study name
    (PostgreSQL ``pg_advisory_lock``, MySQL ``GET_LOCK``): shared by workers on
    every host, released by the database when the holder's connection dies.
    Taking it waits for a database that went away (:func:`with_reconnect`); the
    handle's ``held()`` tells whether a restart dropped it since.
    Journal file: an fcntl lock on ``lock_path`` (one host).
    """
    storage = _backend(study)
    if not _is_rdb(storage):
        with file_lock(lock_path):
            yield LockHandle()
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

    def locked():
        conn = engine.connect()
        try:
            conn.execute(text(take), {"k": key})
        except BaseException:
            with suppress(Exception):
                conn.close()
            raise
        return conn

    conn = with_reconnect(storage, locked)
    try:
        yield LockHandle(conn)
    finally:
        try:
            conn.execute(text(give), {"k": key})
        except Exception as err:  # noqa: BLE001 - gone with its connection: nothing to release
            if not _transient(err):
                raise
        finally:
            with suppress(Exception):
                conn.close()


class Heartbeat:
    """Records the trial's heartbeat every ``heartbeat_interval`` s while it runs (RDB storages; for the
    journal file nothing). Optuna's heartbeat thread serves ``optimize()`` only; workers ask and tell.
    While the database is away the beats fail and are tried again at the next interval."""

    def __init__(self, study, trial):
        self.storage, self.trial_id = _backend(study), trial._trial_id
        interval = self.storage.get_heartbeat_interval() if _is_rdb(self.storage) else None
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True) if interval else None

    def _beat(self) -> None:
        global _back_at
        once = getattr(self.storage, "record_heartbeat_once", self.storage.record_heartbeat)
        missed = False
        while not self.stop.wait(self.interval):
            try:
                once(self.trial_id)
            except Exception:  # noqa: BLE001 - a missed beat only risks a reclaim after the grace period
                missed = True
                continue
            if missed:
                _back_at, missed = time.monotonic(), False

    def __enter__(self):
        if self.thread:
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()


def _unbeaten_trial_ids(storage, study_id: int) -> list[int]:
    """RUNNING trials without any heartbeat. A worker records the first one before it leaves the section
    (:func:`run_worker`), so under the lock such a trial belongs to a worker that died, or lost the
    database, between asking and that heartbeat: Optuna's stale check never sees it (no heartbeat)."""
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    def query() -> list[int]:
        session = storage.scoped_session()
        try:
            rows = (session.query(models.TrialModel.trial_id)
                    .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING,
                            ~models.TrialModel.heartbeats.any())
                    .all())  # fmt: skip
            return [row[0] for row in rows]
        finally:
            session.close()

    return with_reconnect(storage, query)


def _stale_trials(study) -> list:
    """RUNNING trials whose worker is gone: no heartbeat for the grace period (not judged in the two
    heartbeat intervals after this process saw the database come back), or none at all (RDB), or a dead
    pid on this host (journal; trials of other hosts cannot be checked from here)."""
    from optuna.trial import TrialState

    storage = _backend(study)
    if _is_rdb(storage):
        stale = set()
        # Right after the database came back every heartbeat looks old: give live workers two beats first.
        if time.monotonic() - _back_at > 2 * (storage.get_heartbeat_interval() or 0):
            stale = set(storage._get_stale_trial_ids(study._study_id))
        stale |= set(_unbeaten_trial_ids(storage, study._study_id))
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id in stale]
    host = socket.gethostname()
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(HOST_ATTR) == host and t.user_attrs.get(PID_ATTR) is not None
            and not _alive(int(t.user_attrs[PID_ATTR]))]


def _fail_and_requeue(study, t) -> bool:
    """Mark the running trial ``t`` FAIL and queue its configuration again (the params it sampled, or those
    it was queued with); False when it finished meanwhile (its worker told it after all)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    params = {**t.system_attrs.get("fixed_params", {}), **t.params}
    if params:  # killed after sampling, or a queued configuration: run it again (else a fresh trial replaces it)
        study.enqueue_trial(params, user_attrs={REQUEUED_ATTR: t.number}, skip_if_exists=False)
    return True


def reclaim_stale(study) -> list[int]:
    """Mark RUNNING trials of dead workers as FAIL and queue their params again; returns their numbers.
    Call it under :func:`worker_lock`."""
    return [t.number for t in _stale_trials(study) if _fail_and_requeue(study, t)]


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


def _ask(study):
    """A new trial with its first heartbeat and its worker recorded, or None when another worker reclaimed
    it meanwhile (possible only when a restart dropped this worker's lock)."""
    from optuna.exceptions import UpdateFinishedTrialError

    trial = study.ask()
    storage = _backend(study)
    try:
        if _is_rdb(storage) and storage.get_heartbeat_interval():
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        trial.set_user_attr(PID_ATTR, os.getpid())
    except UpdateFinishedTrialError:
        return None
    return trial


def _claim(study, lock_path: Path, n_trials: int, out_of_time: Callable[[], bool],
           reclaimed: list[int]) -> tuple[Any, str | None]:
    """The section under :func:`worker_lock`: reclaim, count, and ask while fewer than ``n_trials`` trials
    are complete or running. Returns (the trial or None, why the worker stops or None).

    If a restart dropped the lock before the section ended, another worker may have counted and asked
    meanwhile: take the lock again and check. A trial asked then stays if the study does not overshoot,
    else it is given back (FAIL, its queued configuration queued again). Reclaiming is safe without the
    lock (the database updates a trial's state once) and the stop decisions only grow truer.
    """
    from optuna.trial import TrialState

    trial, recheck = None, False
    while True:
        with worker_lock(study, lock_path) as lock:
            reclaimed += reclaim_stale(study)
            counts = count_trials(study)
            if recheck and trial is not None:
                current = study._storage.get_trial(trial._trial_id)
                if current.state != TrialState.RUNNING:  # reclaimed by another worker, its configuration queued
                    trial = None
                elif counts["complete"] + counts["running"] > n_trials and _fail_and_requeue(study, current):
                    trial = None
            elif not recheck:
                if counts["complete"] >= n_trials:
                    return None, "n_trials"
                if out_of_time():
                    return None, "timeout"
                if counts["complete"] + counts["running"] < n_trials:
                    trial = _ask(study)
            if lock.held():
                return trial, None
        recheck = True
        print("search worker: the database dropped the workers' lock (a restart); taking it again", flush=True)


def _tell(study, trial, values: Sequence[float] | None = None, state=None):
    """Tell the trial and return its final state in the store: as told, or FAIL when another worker
    reclaimed it meanwhile. The storage waits for a database that went away, so a finished evaluation is
    told once it is back, never lost."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        return study.tell(trial, values, state=state, skip_if_finished=True).state
    except UpdateFinishedTrialError:  # finished meanwhile: a reclaim, or this tell whose reply a restart cut off
        return _backend(study).get_trial(trial._trial_id).state


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
    (Ctrl-C) marks the running trial FAIL before re-raising. A database that
    stays away longer than the storage's ``reconnect_timeout`` raises
    :class:`StorageUnavailable` (the running trial is left to be reclaimed).
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    start = time.monotonic()
    ran: list[int] = []
    failed: list[int] = []
    reclaimed: list[int] = []
    streak = 0

    def out_of_time() -> bool:
        return timeout is not None and time.monotonic() - start >= timeout

    while True:
        trial, stop = _claim(study, lock_path, n_trials, out_of_time, reclaimed)
        if stop:
            return WorkerReport(ran, failed, reclaimed, stop)
        if trial is None:
            time.sleep(poll)
            continue
        if on_start:
            on_start(trial)
        t0 = time.perf_counter()
        try:
            with Heartbeat(study, trial):
                values = [float(v) for v in objective(trial)]
        except StorageUnavailable:
            raise
        except KeyboardInterrupt:
            _tell(study, trial, state=TrialState.FAIL)
            if on_end:
                on_end(trial, "FAIL", None, time.perf_counter() - t0)
            raise
        except UpdateFinishedTrialError:  # reclaimed as stale meanwhile: not the objective's failure
            if on_end:
                on_end(trial, "FAIL", None, time.perf_counter() - t0)
            continue
        except Exception:
            _tell(study, trial, state=TrialState.FAIL)
            failed.append(trial.number)
            if on_end:
                on_end(trial, "FAIL", None, time.perf_counter() - t0)
            streak += 1
            if streak >= MAX_CONSECUTIVE_FAILURES:
                raise
            continue
        streak = 0
        if _tell(study, trial, values) != TrialState.COMPLETE:  # reclaimed as stale meanwhile (no heartbeat for the grace period)
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
