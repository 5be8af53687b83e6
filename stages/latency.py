"""Stage `latency`: MACs, parameters and measured latency of every model of the pipeline.

Usage: python -m stages.latency

Variants (all with BatchNorm folded, ``pipeline/fold.py``): the dense model,
timed in PyTorch in NCHW and in channels-last and, on the CPU, in the runtimes
of ``latency.runtimes`` (ONNX Runtime, OpenVINO on its ONNX export; ``native``,
the compiled whole-model plan: ``pipeline/runtimes.py``, outputs checked
against PyTorch), then every method's variants (``Method.latency_variants``:
e.g. DynConv computing densely and masking, the same model with gather-scatter
blocks, the searched model), each in the compiled plan where the plan supports
the model (``pipeline/model_plan.py``; row ``runtime`` says which ran), methods
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

import json
import platform
import tempfile
from pathlib import Path

import torch

from pipeline import methods
from pipeline.cli import run_stage
from pipeline.complexity import count_macs, count_params
from pipeline.config import Config, to_dict
from pipeline.data import load_task, read_card
from pipeline.latency import add_speedups, aggregate, build_variants, headline, run_sessions, runtime_accuracy
from pipeline.metrics import write_metrics
from pipeline.ops import native
from pipeline.paths import RESULTS
from pipeline.runtimes import compile_dense, export_onnx
from pipeline.timing import resolve_threads, tune_malloc
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Normalizer, evaluate, normalized

OUT = RESULTS / "latency"


def main(cfg: Config) -> None:
    malloc_tuned = tune_malloc()
    data = load_task("upstream")
    test_x = normalized(data, "test")
    models, sources, recorded = build_variants(cfg)
    norm = Normalizer(data.mean, data.std)
    complexity, accuracy = {}, {}
    for name, m in models.items():
        complexity[name] = {"macs_per_image": count_macs(sources[name], test_x), **count_params(sources[name])}
        acc = evaluate(m, *data.splits["test"], norm, cfg.latency.eval_batch_size)["acc"]
        accuracy[name] = {"test_acc": acc, "stage_test_acc": recorded[name], "acc_change": acc - recorded[name]}
    compiled = native.load()  # the CPU inference kernels the timed modules use (None: PyTorch paths)
    base = methods.baseline().name
    with stage_run("latency", cfg) as run, tempfile.TemporaryDirectory() as tmp:
        onnx = None
        if cfg.latency.runtimes and "cpu" in cfg.latency.devices:
            onnx = export_onnx(models[base], Path(tmp) / f"{base}.onnx", test_x[:1])
            for rt in cfg.latency.runtimes:
                runtime_model = compile_dense(rt, onnx, resolve_threads(0), models[base])
                acc = runtime_accuracy(runtime_model, data.splits["test"], norm, cfg.latency.eval_batch_size)
                accuracy[f"{base}_{rt}"] = {"test_acc": acc, "stage_test_acc": recorded[base],
                                            "acc_change": acc - recorded[base]}  # fmt: skip
                del runtime_model  # its threads must not spin while the timing processes run
        accuracy[f"{base}_pytorch"] = accuracy[base]
        for name in [f"{base}_pytorch", *[f"{base}_{rt}" for rt in cfg.latency.runtimes]]:
            complexity[name] = complexity[base]
        params = Path(tmp) / "params.json"  # the validated params, for the timing processes
        params.write_text(json.dumps(to_dict(cfg)))
        timed, checks = aggregate(run_sessions(cfg, params), cfg.latency.sessions)
        rows = add_speedups(timed, complexity, cfg.latency.runtimes)
        cpu = platform.processor() or platform.machine()
        result = {
            "torch": torch.__version__, "cpu": cpu, "cores": resolve_threads(0),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "iterations": cfg.latency.iterations, "warmup": cfg.latency.warmup, "sessions": None,
            "timing_sessions": cfg.latency.sessions, "malloc_tuned": malloc_tuned,
            "native_kernels": compiled.__name__ if compiled is not None else None,
            "runtimes": checks, "rows": rows, "accuracy": accuracy, "complexity": complexity,
        }  # fmt: skip
        flat = {}
        for r in rows:
            key = f"{r['variant']}.{r['device']}.t{r['threads']}.b{r['batch']}"
            flat.update({f"{key}.median_ms": r["median_ms"], f"{key}.iqr_ms": r["iqr_ms"],
                         f"{key}.speedup_vs_dense": r["speedup_vs_dense"],
                         f"{key}.speedup_vs_eager": r["speedup_vs_eager"]})  # fmt: skip
            if r["speedup_lo"] is not None:
                flat.update({f"{key}.speedup_lo": r["speedup_lo"], f"{key}.speedup_hi": r["speedup_hi"]})
        for name, a in accuracy.items():
            flat.update({f"{name}.test_acc": a["test_acc"], f"{name}.acc_change": a["acc_change"],
                         f"{name}.macs_per_image": complexity[name]["macs_per_image"]})  # fmt: skip
        summary, result["sessions"] = headline(rows, accuracy)
        OUT.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
        write_metrics(OUT / "metrics.json", summary)
        run.log_metrics(flat, prefix="latency.")
        run.log_metrics(summary, prefix="final.")
        run.log_metrics({f"{rt}.max_abs_diff": c["max_abs_diff"] for rt, c in checks.items()}, prefix="latency.")
        run.set_tags({"cpu": cpu, "cuda": result["cuda"] or "none", "native_kernels": result["native_kernels"] or "none",
                      **{f"runtime.{rt}": c["version"] for rt, c in checks.items()}})  # fmt: skip
        run.log_artifact(RESULTS / "latency.json")
        run.log_dataset("upstream", read_card(), "evaluation")
        write_run_info(OUT / "run.json", run, "latency")
    print("latency: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    run_stage("latency", main, __doc__)
