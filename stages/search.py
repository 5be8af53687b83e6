"""Stage `search@<method>`: Optuna search over SD-Conv thresholds or DynConv budgets.

Usage: python -m stages.search {sdconv,dynconv} [--worker]

With --worker the process only adds trials to the study on the configured
storage (same params.yaml): start it next to a running `dvc repro` to search
with more processes.
"""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.search_stage import main_options, search_method
from pipeline.trials import SEARCHABLE

if __name__ == "__main__":
    run_stage("search", search_method, __doc__, methods=SEARCHABLE, options=main_options)
