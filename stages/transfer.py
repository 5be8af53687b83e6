"""Stage `transfer@<method>`: fine-tune a model on the downstream task.

Usage: python -m stages.transfer {dense,dynet,sdconv,dynconv}
"""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.transfer import TRANSFER_METHODS, transfer_method

if __name__ == "__main__":
    run_stage("transfer", transfer_method, __doc__, methods=TRANSFER_METHODS)
