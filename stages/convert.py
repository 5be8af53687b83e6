"""Stage `convert@<method>`: dense model -> DyNet, SD-Conv or DynConv model, fine-tuned.

Usage: python -m stages.convert {dynet,sdconv,dynconv}
"""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.convert import METHODS
from pipeline.finetune import convert_method

if __name__ == "__main__":
    run_stage("convert", convert_method, __doc__, methods=METHODS)
