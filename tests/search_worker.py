"""A search worker on a cheap objective, run as its own process by tests/test_search.py.

    python tests/search_worker.py STORE STUDY N_TRIALS SLEEP SEED OUT_JSON [HEARTBEAT GRACE [RECONNECT]]

STORE is a journal file, or an RDB URL (heartbeats every HEARTBEAT s, stale after GRACE s, a database that
went away waited for RECONNECT s). A UserError ends it with one line on stderr and exit status 2, as the
stages do.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402

from pipeline.config import TPESamplerCfg  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.search.storage import make_sampler, make_storage, run_worker  # noqa: E402

TPE_3 = TPESamplerCfg(name="tpe", n_startup_trials=3, multivariate=True, constant_liar=True, group=False,
                      n_ei_candidates=24)


def main() -> None:
    store, name, n_trials, pause, seed, out = sys.argv[1:7]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" in store:
        heartbeat, grace = (int(v) for v in sys.argv[7:9])
        reconnect = {"reconnect_timeout": float(sys.argv[9])} if len(sys.argv) > 9 else {}
        storage = make_storage(store, "test", heartbeat, grace, **reconnect)
        lock = Path(out).with_suffix(".lock")  # unused: the database holds the lock
    else:
        storage = optuna.storages.JournalStorage(JournalFileBackend(store))
        lock = Path(store).with_suffix(".lock")
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"],
                                load_if_exists=True, sampler=make_sampler(TPE_3, int(seed)))

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        y = trial.suggest_float("y", 0.0, 1.0)
        time.sleep(float(pause))
        return x, (1 - x) ** 2 + y

    report = run_worker(study, objective, int(n_trials), lock, poll=0.2)
    Path(out).write_text(json.dumps({"ran": report.ran, "reclaimed": report.reclaimed, "stopped_by": report.stopped_by}))


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"search worker: error: {err}", file=sys.stderr)
        sys.exit(2)
