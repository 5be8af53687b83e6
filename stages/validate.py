"""Stage `validate`: check params.yaml against the schema before any other stage runs.

The core schema (pipeline/config.py) and every method group (``convert.<method>``,
``search.<method>``) against the schema of its method (pipeline/methods/).

Every stage depends on its output, whose content never changes, so a valid
edit of params.yaml re-runs only the stages whose own params changed, and an
invalid one stops `dvc repro` here, before any earlier output is removed.
"""

from __future__ import annotations

from pipeline import methods
from pipeline.atomic import write_text
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.paths import RESULTS

MARKER = RESULTS / "validate" / "params-ok"


def main(cfg: Config) -> None:
    methods.validate(cfg)
    write_text(MARKER, "params.yaml is valid\n")
    # The report depends on the search stages' folder; with no search (`search: {}`, e.g. a paper profile)
    # nothing else creates it, and DVC refuses a missing dependency.
    (RESULTS / "search").mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    run_stage("validate", main, __doc__)
