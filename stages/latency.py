"""Stage `latency`: MACs, parameters and measured latency of every model of the pipeline.

Usage: python -m stages.latency

Variants (all with BatchNorm folded, ``pipeline/fold.py``): the dense model,
timed in PyTorch in NCHW and in channels-last and, on the CPU, in the runtimes
of ``latency.runtimes`` (ONNX Runtime, OpenVINO on its ONNX export; ``native``,
the compiled whole-model plan: ``pipeline/runtimes.py``, outputs checked
against PyTorch), then every method's variants (``Method.latency_variants``:
e.g. DynConv computing densely and masking, the same model with gather-scatter
blocks, the searched model), each in the compiled plan where the plan supports
the model (``pipeline/ops/plan``; row ``runtime`` says which ran), methods
in the order of ``convert`` in params.yaml.

Every variant is timed alone in a process of its own, in ``latency.sessions``
sessions of alternating order (``pipeline/latency.py``), per device (CPU; CUDA
when present), thread count and batch size (1 and ``latency.batch_size``), on
the same test images. Per setting the fastest dense runtime is the baseline
(the ``dense`` row names it): every speed-up is against it, session by session,
reported as the geometric mean over sessions with its interval; the speed-up
against PyTorch eager (its faster layout, row ``dense_pytorch``) is kept beside
it. Each variant's test accuracy is measured too, so a speed-up never hides an
accuracy change. On the CPU the models the plan does not support run their
dynamic-conv layers and sparse blocks on the per-layer compiled kernels
(``pipeline/ops/native.py``); which build ran is recorded (``native_kernels``).
"""

from __future__ import annotations

from pipeline.atomic import write_json
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.data import read_card
from pipeline.latency import measure
from pipeline.metrics import write_metrics
from pipeline.paths import RESULTS
from pipeline.timing import tune_malloc
from pipeline.tracking import stage_run, write_run_info

OUT = RESULTS / "latency"


def main(cfg: Config) -> None:
    malloc_tuned = tune_malloc()
    with stage_run("latency", cfg) as run:
        result, summary, flat = measure(cfg, malloc_tuned)
        OUT.mkdir(parents=True, exist_ok=True)
        write_json(RESULTS / "latency.json", result)
        write_metrics(OUT / "metrics.json", summary)
        run.log_metrics(flat, prefix="latency.")
        run.log_metrics(summary, prefix="final.")
        run.set_tags({"cpu": result["cpu"], "cuda": result["cuda"] or "none",
                      "native_kernels": result["native_kernels"] or "none",
                      **{f"runtime.{rt}": c["version"] for rt, c in result["runtimes"].items()}})  # fmt: skip
        run.log_artifact(RESULTS / "latency.json")
        run.log_dataset("upstream", read_card(), "evaluation")
        write_run_info(OUT / "run.json", run, "latency")
    print("latency: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    run_stage("latency", main, __doc__)
