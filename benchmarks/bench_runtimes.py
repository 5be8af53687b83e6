"""The pipeline's models against the dense model in every runtime, each timed alone in its own process.

    python -m benchmarks.bench_runtimes [--processes 3] [--iterations 60] [--warmup 10] [--threads 1,0]

Needs the models of a `dvc repro` (models/*.pt) and data/prepared. The latency
stage's measurement (``pipeline/latency.py``) with other counts: every variant
of the stage (BN-folded; in the compiled whole-model plan where it supports
the model) and the dense model in PyTorch eager (NCHW and channels-last), ONNX
Runtime, OpenVINO and the compiled plan (``pipeline/runtimes.py``: f32, each
runtime's own settings) runs in a process of its own, at batch 1 and
``latency.batch_size``, for each thread count (0 = all cores); ``--processes``
sessions of alternating order, one process per variant in each.

Prints one row per (threads, batch, variant): the median over sessions, the
ratio to the fastest dense runtime of the same setting (geometric mean over
sessions, > 1: faster than every dense runtime) with its 95 % interval over
sessions, and the ratio to PyTorch eager; plus each runtime's largest deviation
from PyTorch's logits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline import methods
from pipeline.complexity import count_macs, count_params
from pipeline.config import load_config, to_dict
from pipeline.data import load_task
from pipeline.latency import add_speedups, aggregate, build_variants, job_names, run_sessions
from pipeline.paths import repo_root
from pipeline.train import normalized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3, help="sessions: processes per variant")
    parser.add_argument("--iterations", type=int, default=60, help="timed calls per process and setting (>= 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    parser.add_argument("--threads", default="1,0", help="thread counts, comma-separated (0 = all cores)")
    args = parser.parse_args()
    if args.processes < 1 or args.iterations < 30 or args.warmup < 0:
        parser.error("--processes >= 1, --iterations >= 30 and --warmup >= 0")
    cfg = load_config(repo_root() / "params.yaml")
    cfg = cfg.model_copy(update={"latency": cfg.latency.model_copy(update={
        "sessions": args.processes, "iterations": args.iterations, "warmup": args.warmup,
        "threads": [int(t) for t in args.threads.split(",")], "devices": ["cpu"]})})  # fmt: skip
    base = methods.baseline().name
    _, sources, _ = build_variants(cfg)
    images = normalized(load_task("upstream"), "test")
    complexity = {name: {"macs_per_image": count_macs(m, images[:64]), **count_params(m)} for name, m in sources.items()}
    for name in [f"{base}_pytorch", *[f"{base}_{rt}" for rt in cfg.latency.runtimes]]:
        complexity[name] = complexity[base]
    names = job_names(cfg)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.json"
        params.write_text(json.dumps(to_dict(cfg)))
        timed, checks = aggregate(run_sessions(cfg, params, names), args.processes)
    rows = add_speedups(timed, complexity, cfg.latency.runtimes)
    print(f"\n{len(names)} variants x {args.processes} sessions in {time.perf_counter() - t0:.0f} s; "
          f"median over sessions ({args.iterations} calls after {args.warmup} warm-up in each process)")
    for rt, c in checks.items():
        print(f"{base}_{rt}: {c['version']}, max abs difference from PyTorch {c['max_abs_diff']:.1e}")
    print("\n| threads | batch | variant | runtime | median (ms) | vs fastest dense [95 % over sessions] "
          "| vs PyTorch eager |\n|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (fastest dense)" if r["variant"] == base else ""
        interval = f" [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]" if r["speedup_lo"] is not None else ""
        print(f"| {r['threads']} | {r['batch']} | {r['variant']}{mark} | {r['runtime']} | {r['median_ms']:.3f} "
              f"| {r['speedup_vs_dense']:.2f} x{interval} | {r['speedup_vs_eager']:.2f} x |")


if __name__ == "__main__":
    main()
