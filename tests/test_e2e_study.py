"""End to end: a study (a 2 x 2 ablation grid of DVC experiments in temporary copies) against a real
MLflow tracking server, then the study report built from the server's runs."""

from __future__ import annotations

import sys
import time

import pytest

from .e2e_project import _runs, _sh, project, tracking_server

pytestmark = pytest.mark.e2e
__all__ = ["project", "tracking_server"]  # fixtures, used by name


def test_study_of_an_ablation_renders_the_values_of_its_mlflow_runs(project):
    """A 2 x 2 grid (K = 1, 2; training seeds 0, 1) as DVC experiments, then the study report."""
    root, env = project
    t0 = time.perf_counter()
    _sh([sys.executable, "-m", "stages.study", "run", "abl", "--seeds", "0,1", "-S", "convert.dynet.num_kernels=1,2",
         "-S", "pretrain.epochs=1", "-S", "pretrain.schedule.warmup_epochs=0", "--stage", "convert@dynet"], root, env,
        timeout=1500)
    print(f"tiny study of 4 experiments: {time.perf_counter() - t0:.1f}s")
    runs = _runs(env)
    mine = runs[(runs["params.tracking.study"] == "abl") & (runs["tags.stage"] == "convert@dynet")]
    assert len(mine) == 4 and mine["params.train_seed"].nunique() == 2
    md = (root / "reports/study.md").read_text()
    section = md.split("## Ablation: convert.dynet.num_kernels", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    for k, group in mine.groupby("params.convert.dynet.num_kernels"):
        assert len(group) == 2
        assert f"{group['metrics.final.test_acc'].astype(float).mean():.4f}" in rows[k]
    assert "## Verdicts: convert.dynet.num_kernels=1" in md and "(n = 2)" in md
    assert (root / "reports/study.html").stat().st_size > 5_000
    assert list((root / "reports/study_figures").glob("ablation_*.png"))
    shown = _sh(["dvc", "exp", "show", "--json"], root, env).stdout
    assert "train_seed" in shown and all(f"abl-{i:02d}" in shown for i in range(4))
    assert not list((root / ".dvc" / "tmp").glob("exps/*/mlflow.db"))  # no store left in a temporary copy
