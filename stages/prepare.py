"""Stage `prepare`: build the upstream and downstream tasks and their data card."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.data import TASKS, build_task, write_prepared
from pipeline.errors import DataError
from pipeline.paths import PREPARED, RESULTS
from pipeline.tracking import stage_run, write_run_info


def main(cfg: Config) -> None:
    with stage_run("prepare", cfg) as run:
        tasks = {name: build_task(cfg, name) for name in TASKS}
        up, down = tasks["upstream"], tasks["downstream"]
        if up.shape[0] != down.shape[0]:
            raise DataError(
                f"data.downstream: {down.shape[0]}-channel images cannot be fed to a model pretrained on "
                f"{up.shape[0]}-channel upstream images; pick data sets with the same channel count"
            )
        card = _write_swapped(tasks, cfg)
        for name, tc in card["tasks"].items():
            run.log_metrics({f"{name}.{s}_images": n for s, n in tc["counts"].items()})
            run.log_metrics({f"{name}.classes": len(tc["classes"])})
        run.log_artifact(PREPARED / "card.json")
        for name in TASKS:
            run.log_dataset(name, card, "prepared")
        write_run_info(RESULTS / "prepare" / "run.json", run, "prepare")
    for name, tc in card["tasks"].items():
        counts = ", ".join(f"{s} {n}" for s, n in tc["counts"].items())
        print(f"prepare: {name}: {tc['source']} {tc['image_shape']} ({counts})")


def _write_swapped(tasks: dict, cfg: Config) -> dict:
    """Build in a temporary folder and swap at the end: a failure leaves the old outputs intact."""
    PREPARED.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepared-", dir=PREPARED.parent))
    try:
        card = write_prepared(tasks, cfg, tmp)
        tmp.chmod(0o755)
        if PREPARED.exists():
            shutil.rmtree(PREPARED)
        tmp.rename(PREPARED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


if __name__ == "__main__":
    run_stage("prepare", main, __doc__)
