"""Where things live. Stage outputs are relative to the working directory (DVC
runs every stage from the repository root); stores shared across experiments
(MLflow) are absolute and derived from the repository root."""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
MODELS = Path("models")
RESULTS = Path("results")
REPORTS = Path("reports")
CHECKPOINTS = Path("checkpoints")


def repo_root(code_dir: Path | None = None) -> Path:
    """The repository this code belongs to.

    A queued ``dvc exp run`` executes in a temporary copy under
    ``<repo>/.dvc/tmp/exps/<tmp>/``; stores must still land in ``<repo>``, so a
    path inside such a copy maps back to the repository that owns it.
    """
    here = (code_dir or Path(__file__).resolve().parent.parent).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def stage_results(stage: str, results: Path = RESULTS) -> Path:
    """The results folder of a stage: ``pretrain`` -> results/pretrain, ``convert@m`` and ``control@m`` ->
    results/convert/m, ``search@m`` -> results/search/m, ``transfer@m`` -> results/transfer/m."""
    kind, _, item = stage.partition("@")
    if not item:
        return results / kind
    return results / ("convert" if kind == "control" else kind) / item
