"""Stage `latency`: MACs, params and measured latency of every model, dense vs sparse execution."""

from __future__ import annotations

from pipeline.cli import run_stage
from pipeline.latency_stage import latency

if __name__ == "__main__":
    run_stage("latency", latency, __doc__)
