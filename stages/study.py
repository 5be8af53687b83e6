"""Seed studies and ablations across DVC experiments (outside the DAG): reports/study.{md,html}.

Usage:
  python -m stages.study run NAME [--seeds 0,1,2] [-S key=v1,v2 ...] [--stage STAGE ...] [--vary-data-seed]
  python -m stages.study run NAME --until-resolved --max-seeds N [--min-seeds 3] [--round 1] [...]
  python -m stages.study report NAME
  python -m stages.study plan NAME

`run` runs one DVC experiment per seed and per combination of the -S grids,
one after the other (`dvc exp run --temp -f -n NAME-<i> -S train_seed=<s>
-S tracking.study=NAME -S key=v ...`), then writes the study report. Every
experiment reruns every stage it targets (-f), so each one is a complete set of
MLflow runs tagged with the study; the experiments stay visible to `dvc exp show`.
`--vary-data-seed` sets `data.seed` to the training seed as well, so the data
pools, renders and splits vary with the seed (Bouthillier et al., MLSys 2021);
pairing stays within one execution.

`--until-resolved` runs a group-sequential study: seeds in rounds (looks after
--min-seeds, then every --round seeds, up to --max-seeds), the verdicts judged
at each look with repeated p-values under the alpha-spending function
`verdicts.spending` (pipeline/stats.py), stopping once every claim is resolved.
The looks are fixed before the first seed runs and recorded in the study's
MLflow run, so `report` rebuilds the same analysis.

One study runs in a workspace at a time: `run` holds a lock file
(`.dvc/tmp/study.lock`) for its whole run, and another `run` in the same
workspace meanwhile stops at once with one line naming the study that holds it
and its pid (its experiments would share the workspace's Optuna stores and
DVC's lock).

A study pools one code version: `run` refuses uncommitted code changes, and a
study name whose runs came from another commit stops with both commits named.
By default the experiments run the stages the verdicts read and what those
need; --stage names the stages instead (repeatable), --all-stages runs the
whole pipeline. `report` rebuilds the report from MLflow alone; `plan` prints,
for an existing study, each claim's verdict and the seeds that would resolve it.

Why DVC experiments: they are DVC's unit of a params variation, so each seed and
grid point is reproducible (`dvc exp apply`), comparable in `dvc exp show`, and
its stages are cached; MLflow holds the runs the report aggregates. They run
one at a time in temporary copies (`--temp`): DVC's queue (`--queue`, then
`--run-all`) took 4 min 20 s for four tiny experiments that take 32 s each this way.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pipeline import methods
from pipeline.claims import Sequential, stages_read
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.errors import DataError, UserError
from pipeline.paths import repo_root
from pipeline.report.study import build_study_report, integrity, judge_setting, load, settings
from pipeline.search.storage import LockBusy, file_lock
from pipeline.tracking import client_and_experiment, find_or_create_run, git_state, start_child_run


def grid(seeds: str | list[str], overrides: list[str], vary_data_seed: bool = False) -> list[list[str]]:
    """Every combination of the seeds and the -S grids (``key=v1,v2``; a ``[a,b]`` list is one value), as the
    ``key=value`` overrides of one experiment each."""
    listed = seeds.split(",") if isinstance(seeds, str) else seeds
    seed_axis = []
    for s in (s.strip() for s in listed if s.strip()):
        point = [f"train_seed={s}"]
        if vary_data_seed:
            point += [f"data.seed={s}", "tracking.vary_data_seed=true"]
        seed_axis.append(point)
    axes = [seed_axis]
    for o in overrides:
        key, sep, values = o.partition("=")
        if not sep or not key:
            raise UserError(f"-S {o!r}: expected key=value or key=v1,v2")
        parts = [values] if values.startswith("[") else values.split(",")
        axes.append([[f"{key}={v}"] for v in parts])
    return [[o for part in combo for o in part] for combo in itertools.product(*axes)]


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


def planned_looks(min_seeds: int, step: int, max_seeds: int) -> tuple[int, ...]:
    """Looks after ``min_seeds``, then every ``step`` seeds, and at ``max_seeds``."""
    if min_seeds < 2 or step < 1 or max_seeds < min_seeds:
        raise UserError(f"--min-seeds {min_seeds} (>= 2), --round {step} (>= 1), --max-seeds {max_seeds} "
                        f"(>= --min-seeds): impossible plan")
    looks = list(range(min_seeds, max_seeds + 1, step))
    return tuple(looks if looks[-1] == max_seeds else [*looks, max_seeds])


def check_code_version(cfg: Config, name: str) -> str:
    """The commit this study runs on; stops on uncommitted code changes or earlier runs of another commit."""
    git = git_state()
    if git["dirty"] != "false":
        raise UserError(f"study {name}: the working tree has uncommitted code changes (git status); a study pools "
                        "one code version: commit them first")
    try:
        earlier = load(name, cfg.tracking.experiment)
    except DataError:
        return git["commit"]
    other = sorted({e.commit for e in earlier} - {git["commit"]})
    if other:
        raise UserError(f"study {name} already holds runs of commit {other[0][:10]}; this code is commit "
                        f"{git['commit'][:10]}: a study never pools two code versions; run it under a new name")
    return git["commit"]


def _unresolved(cfg: Config, name: str, plan: Sequential | None) -> list[str]:
    executions = load(name, cfg.tracking.experiment)
    integrity(name, executions)
    return [f"{st.label()}: {j.claim.id}" for st in settings(executions) for j in judge_setting(st, cfg, plan)
            if j.verdict == "inconclusive" or j.verdict.startswith("incomplete")]


STUDY_LOCK = Path(".dvc/tmp/study.lock")  # under the repository root, ignored by git like DVC's own lock


def lock_path() -> Path:
    return repo_root() / STUDY_LOCK


@contextmanager
def one_study_at_a_time(name: str) -> Iterator[None]:
    """Hold the workspace's study lock, or stop at once naming the study that holds it."""
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(lock_path(), wait=False, holder=f"study {name} (pid {os.getpid()})"))
        except LockBusy as busy:
            raise UserError(f"study {name}: {busy.holder or 'another study'} is running in this workspace "
                            f"({STUDY_LOCK} is locked); wait for it to end, or run this one in another clone") from None
        yield


def main(cfg: Config, action: str, name: str, **options) -> None:
    if action != "run":
        return _main(cfg, action, name, **options)
    with one_study_at_a_time(name):
        _main(cfg, action, name, **options)


def _main(cfg: Config, action: str, name: str, seeds: str = "0,1,2", set: list[str] | None = None,
          stage: list[str] | None = None, all_stages: bool = False, vary_data_seed: bool = False,
          until_resolved: bool = False, max_seeds: int | None = None, min_seeds: int = 3, round: int = 1) -> None:
    client, exp_id = client_and_experiment(cfg)
    parent = _study_parent(client, exp_id, name)
    plan = _recorded_plan(client, parent, cfg)
    if action == "plan":
        _print_plan(cfg, name, plan)
        return
    if action == "run":
        if stage and all_stages:
            raise UserError("--stage and --all-stages exclude each other")
        if until_resolved and max_seeds is None:
            raise UserError("--until-resolved needs --max-seeds N")
        check_code_version(cfg, name)
        targets = [] if all_stages else stage or verdict_stages(cfg, _pipeline_stages())
        print(f"study {name}: stages {' '.join(targets) if targets else '(the whole pipeline)'}", flush=True)
        t0 = time.perf_counter()
        if until_resolved:
            plan = Sequential(planned_looks(min_seeds, round, max_seeds), cfg.verdicts.spending)
            client.set_tag(parent, "looks", json.dumps(list(plan.looks)))
            client.set_tag(parent, "spending", plan.spending)
            ran = index = 0
            for look, n in enumerate(plan.looks):
                points = grid([str(s) for s in range(ran, n)], set or [], vary_data_seed)
                for point in points:
                    print(f"study {name}: look {look + 1}/{len(plan.looks)}: {' '.join(point)}", flush=True)
                    _dvc(experiment_command(name, index, point, targets))
                    index += 1
                ran = n
                left = _unresolved(cfg, name, plan)
                print(f"study {name}: look {look + 1} (n = {n}): {len(left)} claim(s) unresolved"
                      + (f": {', '.join(left)}" if left else ""), flush=True)
                if not left:
                    break
        else:
            points = grid(seeds, set or [], vary_data_seed)
            for i, point in enumerate(points):
                print(f"study {name}: experiment {i + 1}/{len(points)}: {' '.join(point)}", flush=True)
                _dvc(experiment_command(name, i, point, targets))
        print(f"study {name}: experiments ran in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = build_study_report(name, cfg, plan=plan)
    run = start_child_run(client, exp_id, parent, f"study {name} report", {"kind": "study-report", "study": name}, {})
    run.log_artifact(paths["markdown"], "study")
    run.log_artifact(paths["html"], "study")
    run.log_artifact(paths["figures"], "study/figures")
    run.end()
    print(f"study {name}: wrote {paths['markdown']} and {paths['html']}")


def _print_plan(cfg: Config, name: str, plan: Sequential | None) -> None:
    """Each claim's verdict, n, and the seeds that would resolve it at the observed mean and spread."""
    executions = load(name, cfg.tracking.experiment)
    integrity(name, executions)
    for st in settings(executions):
        print(f"study {name}: {st.label()} (n = {len(st.executions)})")
        print(f"  {'claim':32s} {'verdict':18s} {'n':>3s} {'seeds needed':>12s}")
        for j in judge_setting(st, cfg, plan):
            needed = j.seeds_needed if j.seeds_needed else ("-" if j.verdict != "inconclusive" else "no number")
            print(f"  {j.claim.id:32s} {j.verdict[:18]:18s} {j.n:3d} {needed!s:>12s}")


def _recorded_plan(client, parent: str, cfg: Config) -> Sequential | None:
    tags = client.get_run(parent).data.tags
    if "looks" not in tags:
        return None
    return Sequential(tuple(json.loads(tags["looks"])), tags.get("spending", cfg.verdicts.spending))


def _study_parent(client, exp_id: str, name: str) -> str:
    return find_or_create_run(client, exp_id, {"kind": "study-group", "study": name}, f"study {name}", {})


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["run", "report", "plan"],
                        help="run: run the experiments, then report; plan: seeds each claim would need")
    parser.add_argument("name", help="the study's name (tracking.study of its runs)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("-S", "--set", action="append", metavar="KEY=V1,V2",
                        help="a params grid, as for `dvc exp run -S` (repeatable)")
    parser.add_argument("--stage", action="append", metavar="STAGE",
                        help="run only this stage and what it needs (repeatable; default: the stages the verdicts read)")
    parser.add_argument("--all-stages", action="store_true", help="run the whole pipeline in every experiment")
    parser.add_argument("--vary-data-seed", action="store_true",
                        help="data.seed follows the training seed (pools, renders and splits vary too)")
    parser.add_argument("--until-resolved", action="store_true",
                        help="group-sequential: seeds in rounds until every claim resolves or --max-seeds ran")
    parser.add_argument("--max-seeds", type=int, help="the last planned look of --until-resolved")
    parser.add_argument("--min-seeds", type=int, default=3, help="seeds at the first look (default 3)")
    parser.add_argument("--round", type=int, default=1, help="seeds added between looks (default 1)")


if __name__ == "__main__":
    run_stage("study", main, __doc__, options=options)
