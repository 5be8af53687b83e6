"""Seed studies and ablations across DVC experiments (outside the DAG): reports/study.{md,html}.

Usage:
  python -m stages.study run NAME [--seeds 0,1,2] [-S key=v1,v2 ...] [--stage STAGE ...]
  python -m stages.study report NAME

`run` runs one DVC experiment per training seed and per combination of the
-S grids, one after the other (`dvc exp run --temp -f -n NAME-<i> -S train_seed=<s>
-S tracking.study=NAME -S key=v ...`), then writes the study report. Every
experiment reruns every stage it targets (-f), so each one is a complete set of
MLflow runs tagged with the study; the experiments stay visible to `dvc exp show`.
The controls are the ones params.yaml's `controls` lists. By default the
experiments run the stages the verdicts read (the claims' effects of the methods
in params.yaml: pretraining, the conversions, the controls, the transfers and the
latency they compare) and what those need; --stage names the stages instead
(repeatable), --all-stages runs the whole pipeline. `report` rebuilds the report
from MLflow alone.

Why DVC experiments: they are DVC's unit of a params variation, so each seed and
grid point is reproducible (`dvc exp apply`), comparable in `dvc exp show`, and
its stages are cached; MLflow holds the runs the report aggregates. They run
one at a time in temporary copies (`--temp`): DVC's queue (`--queue`, then
`--run-all`) took 4 min 20 s for four tiny experiments that take 32 s each this way.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import time

from pipeline import methods
from pipeline.claims import stages_read
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.report.study import build_study_report
from pipeline.tracking import client_and_experiment, find_or_create_run, start_child_run


def grid(seeds: str, overrides: list[str]) -> list[list[str]]:
    """Every combination of the seeds and the -S grids (``key=v1,v2``; a ``[a,b]`` list is one value), as the
    ``key=value`` overrides of one experiment each."""
    axes = [[f"train_seed={s.strip()}" for s in seeds.split(",") if s.strip()]]
    for o in overrides:
        key, sep, values = o.partition("=")
        if not sep or not key:
            raise UserError(f"-S {o!r}: expected key=value or key=v1,v2")
        parts = [values] if values.startswith("[") else values.split(",")
        axes.append([f"{key}={v}" for v in parts])
    return [list(combo) for combo in itertools.product(*axes)]


def experiment_command(name: str, index: int, point: list[str], stages: list[str]) -> list[str]:
    cmd = ["dvc", "exp", "run", "--temp", "-f", "-n", f"{name}-{index:02d}", "-S", f"tracking.study={name}"]
    for o in point:
        cmd += ["-S", o]
    return cmd + stages


def _dvc(cmd: list[str]) -> None:
    print("study: " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed (see its output above)")


def verdict_stages(cfg: Config, pipeline_stages: list[str]) -> list[str]:
    """The stages of the pipeline whose metrics the claims of the methods in params.yaml read."""
    read = stages_read([c for m in methods.in_pipeline(cfg) for c in m.claims()])
    return [s for s in pipeline_stages if s in read]


def _pipeline_stages() -> list[str]:
    proc = subprocess.run(["dvc", "stage", "list", "--name-only"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"`dvc stage list` failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout.split()


def main(cfg: Config, action: str, name: str, seeds: str = "0,1,2", set: list[str] | None = None,
         stage: list[str] | None = None, all_stages: bool = False) -> None:
    if action == "run":
        points = grid(seeds, set or [])
        if stage and all_stages:
            raise UserError("--stage and --all-stages exclude each other")
        targets = [] if all_stages else stage or verdict_stages(cfg, _pipeline_stages())
        print(f"study {name}: stages {' '.join(targets) if targets else '(the whole pipeline)'}", flush=True)
        t0 = time.perf_counter()
        for i, point in enumerate(points):
            print(f"study {name}: experiment {i + 1}/{len(points)}: {' '.join(point)}", flush=True)
            _dvc(experiment_command(name, i, point, targets))
        print(f"study {name}: {len(points)} experiments ran in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = build_study_report(name, cfg)
    client, exp_id = client_and_experiment(cfg)
    run = start_child_run(client, exp_id, _study_parent(client, exp_id, name), f"study {name} report",
                          {"kind": "study-report", "study": name}, {})
    run.log_artifact(paths["markdown"], "study")
    run.log_artifact(paths["html"], "study")
    run.log_artifact(paths["figures"], "study/figures")
    run.end()
    print(f"study {name}: wrote {paths['markdown']} and {paths['html']}")


def _study_parent(client, exp_id: str, name: str) -> str:
    return find_or_create_run(client, exp_id, {"kind": "study-group", "study": name}, f"study {name}", {})


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["run", "report"], help="run: run the experiments, then report")
    parser.add_argument("name", help="the study's name (tracking.study of its runs)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("-S", "--set", action="append", metavar="KEY=V1,V2",
                        help="a params grid, as for `dvc exp run -S` (repeatable)")
    parser.add_argument("--stage", action="append", metavar="STAGE",
                        help="run only this stage and what it needs (repeatable; default: the stages the verdicts read)")
    parser.add_argument("--all-stages", action="store_true", help="run the whole pipeline in every experiment")


if __name__ == "__main__":
    run_stage("study", main, __doc__, options=options)
