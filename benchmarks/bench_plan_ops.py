"""Where a compiled plan spends its time: per op, one thread, batch 1.

    python -m benchmarks.bench_plan_ops [--arch cifar_mobilenetv2] [--variant dense] [--calls 200] [--top 25]
                                        [--threads 1]

Builds the untrained model of ``--variant`` (``dense`` or a method of
``convert``) on ``--arch`` exactly as ``benchmarks/bench_plan_archs.py`` does
(SD-Conv's sparsity and DynConv's masks set by hand), compiles it, and runs
``--calls`` calls of one image with the plan's per-op timers on
(``ModelPlan.set_profiling``): on one thread, or with ``--threads`` > 1 every
thread sharing each op (an op's time then ends when its slowest share does). Prints the ops in plan order with their share of
the time, then the total by kind of op; the sum of the ops against the call's
own median tells how much is outside them (the pooling head, the input copy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from benchmarks.bench_plan_archs import SHAPE, _images, build
from pipeline.ops.plan.builder import PlanBuilder


def profile(arch: str, variant: str, calls: int, sparsity: float = 0.8,
            threads: int = 1) -> tuple[list[tuple[str, float]], float]:
    """([(op label, seconds per call)] in plan order, median seconds of a whole call) on ``threads`` threads
    sharing each image."""
    model, _ = build(arch, variant, sparsity)
    torch.set_num_threads(threads)
    b = PlanBuilder(SHAPE)
    with torch.no_grad():
        model.plan_into(b)
    plan = b.plan
    plan.set_team_policy(2 if threads > 1 else 1)
    x = _images(1)
    for _ in range(20):
        plan.forward(x)
    whole = []
    for _ in range(calls):
        t = time.perf_counter()
        plan.forward(x)
        whole.append(time.perf_counter() - t)
    plan.set_profiling(True)
    for _ in range(calls):
        plan.forward(x)
    plan.set_profiling(False)
    times = [seconds / calls for _kind, _index, seconds in plan.profile()]
    if len(times) != len(b.labels):
        raise RuntimeError(f"{len(times)} ops but {len(b.labels)} labels")
    return list(zip(b.labels, times)), statistics.median(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cifar_mobilenetv2")
    parser.add_argument("--variant", default="dense", help="dense or a method of convert")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=0, help="print only the N slowest ops (0: all, in order)")
    parser.add_argument("--sdconv-sparsity", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help="threads sharing each image")
    args = parser.parse_args()
    ops, whole = profile(args.arch, args.variant, args.calls, args.sdconv_sparsity, args.threads)
    total = sum(t for _, t in ops)
    print(f"{args.arch} {args.variant}: one call {whole * 1e3:.3f} ms (median of {args.calls}), ops {total * 1e3:.3f} "
          f"ms, {args.threads} thread(s) sharing each image, batch 1")
    shown = sorted(ops, key=lambda o: -o[1])[: args.top] if args.top else ops
    for label, t in shown:
        print(f"{t * 1e6:9.1f} us {100 * t / total:5.1f} %  {label}")
    kinds: dict[str, float] = defaultdict(float)
    for label, t in ops:
        words = label.split(" (")[0].split()
        kinds[" ".join(w for w in words if not w[0].isdigit() and "." not in w) or label] += t
    print("by kind:")
    for kind, t in sorted(kinds.items(), key=lambda k: -k[1]):
        print(f"{t * 1e6:9.1f} us {100 * t / total:5.1f} %  {kind}")


if __name__ == "__main__":
    main()
