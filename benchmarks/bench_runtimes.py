"""The pipeline's models against the dense model in every runtime, each timed alone in its own process.

    python -m benchmarks.bench_runtimes [--processes 3] [--iterations 60] [--warmup 10] [--threads 1,0]

Needs the models of a `dvc repro` (models/*.pt) and data/prepared. Every
variant of the latency stage (BN-folded; in the compiled whole-model plan where
it supports the model, as in the stage) and the dense model in PyTorch eager
(NCHW and channels-last), ONNX Runtime, OpenVINO and the compiled plan
(``pipeline/runtimes.py``: f32, settings as in the stage) runs in a process of
its own, at batch 1 and ``latency.batch_size``, for each thread count (0 = all
cores); ``--processes`` processes per variant, and the table shows the median
of their medians. Nothing else runs in the process, so no runtime's threads can
slow another's; the latency stage times the same variants in blocks in one
process, and the two tables should agree.

Prints one row per (threads, batch, variant) with the ratio to the fastest
dense runtime of the same setting (> 1: faster than every dense runtime) and to
PyTorch eager, plus each runtime's largest deviation from PyTorch's logits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from pipeline.paths import repo_root

PYTORCH_DENSE = ("dense", "dense_channels_last")


def worker(variant: str, threads_list: list[int], iterations: int, warmup: int) -> dict:
    """Median ms per (threads, batch) of one variant, timed alone in this process."""
    import tempfile
    from pathlib import Path

    import torch

    from pipeline import methods
    from pipeline.config import load_config
    from pipeline.data import load_task
    from pipeline.runtimes import compile_dense, export_onnx, max_abs_diff
    from pipeline.timing import time_blocks, torch_threads, tune_malloc
    from pipeline.train import normalized
    from stages.latency import _inputs, build_variants

    tune_malloc()
    cfg = load_config(repo_root() / "params.yaml")
    base = methods.baseline().name
    models, _, _ = build_variants(cfg)
    images = normalized(load_task("upstream"), "test")
    out: dict = {"variant": variant, "timings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runtime = variant.removeprefix(f"{base}_") if variant.startswith(f"{base}_") else None
        if runtime not in cfg.latency.runtimes:
            runtime = None
        onnx = export_onnx(models[base], Path(tmp) / "dense.onnx", images[:1]) if runtime else None
        for threads in threads_list:
            with torch_threads(threads) as used:
                compiled = compile_dense(runtime, onnx, used, models[base]) if runtime else None
                for batch in (1, cfg.latency.batch_size):
                    xs = _inputs(images, batch, iterations + warmup, torch.device("cpu"))
                    if compiled is not None:
                        arrays = [x.numpy() for x in xs]
                        call = lambda i: compiled.run(arrays[i])  # noqa: E731
                        out["max_abs_diff"] = max(out.get("max_abs_diff", 0.0), max_abs_diff(compiled, models[base], xs[:3]))
                        out["version"] = compiled.version
                    elif variant == f"{base}_channels_last":
                        model = models[base].to(memory_format=torch.channels_last)
                        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
                        call = lambda i: model(xs[i])  # noqa: E731
                    else:
                        model = models[variant]
                        call = lambda i: model(xs[i])  # noqa: E731
                    t = time_blocks({variant: call}, iterations, warmup, torch.device("cpu"))[variant]
                    out["timings"][f"{used},{batch}"] = t.median_ms
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3, help="processes per variant (median of their medians)")
    parser.add_argument("--iterations", type=int, default=60, help="timed calls per process and setting (>= 4)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    parser.add_argument("--threads", default="1,0", help="thread counts, comma-separated (0 = all cores)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, threads, args.iterations, args.warmup)))
        return
    if args.processes < 1 or args.iterations < 4 or args.warmup < 0:
        parser.error("--processes >= 1, --iterations >= 4 and --warmup >= 0")

    from pipeline import methods
    from pipeline.config import load_config
    from stages.latency import variants as stage_variants

    cfg = load_config(repo_root() / "params.yaml")
    base = methods.baseline().name
    names = [*PYTORCH_DENSE, *[f"{base}_{rt}" for rt in cfg.latency.runtimes],
             *[v.name for v in stage_variants(cfg) if v.name != base]]  # fmt: skip
    results: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for rep in range(args.processes):
        for name in names:  # variants take turns, process by process
            cmd = [sys.executable, "-m", "benchmarks.bench_runtimes", "--worker", name, "--threads", args.threads,
                   "--iterations", str(args.iterations), "--warmup", str(args.warmup)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root(), env=os.environ)
            if proc.returncode != 0:
                sys.exit(f"bench_runtimes: {name} failed:\n{proc.stderr[-2000:]}")
            results.setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  process {rep + 1}/{args.processes}: {name}", file=sys.stderr, flush=True)
    settings = list(results[names[0]][0]["timings"])
    median = {n: {s: statistics.median(r["timings"][s] for r in rs) for s in settings} for n, rs in results.items()}
    dense = [n for n in names if n in PYTORCH_DENSE or n.startswith(f"{base}_")]
    print(f"\n{len(names)} variants x {args.processes} processes in {time.perf_counter() - t0:.0f} s; "
          f"median of the processes' medians ({args.iterations} calls after {args.warmup} warm-up each)")
    for name in dense:
        diff = results[name][0].get("max_abs_diff")
        if diff is not None:
            print(f"{name}: {results[name][0]['version']}, max abs difference from PyTorch {diff:.1e}")
    print("\n| threads | batch | variant | median (ms) | vs fastest dense | vs PyTorch eager |\n|---|---|---|---|---|---|")
    for s in settings:
        used, batch = s.split(",")
        fastest = min(dense, key=lambda n: median[n][s])
        eager = min(median[n][s] for n in PYTORCH_DENSE)
        for name in names:
            mark = " (fastest dense)" if name == fastest else ""
            print(f"| {used} | {batch} | {name}{mark} | {median[name][s]:.3f} | {median[fastest][s] / median[name][s]:.2f} x "
                  f"| {eager / median[name][s]:.2f} x |")


if __name__ == "__main__":
    main()
