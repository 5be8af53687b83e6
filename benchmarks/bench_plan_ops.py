"""Where a compiled plan spends its time: per op, one thread, batch 1.

    python -m benchmarks.bench_plan_ops [--arch cifar_mobilenetv2] [--variant dense] [--calls 200] [--top 25]
                                        [--threads 1] [--onnxruntime]
    python -m benchmarks.bench_plan_ops --arch resnet50 [--size 224] [--variant dense] [--onnxruntime]

Builds the untrained model of ``--variant`` (``dense`` or a method of
``convert``) on ``--arch`` exactly as ``benchmarks/bench_plan_archs.py`` does
(SD-Conv's sparsity and DynConv's masks set by hand), compiles it, and runs
``--calls`` calls of one image with the plan's per-op timers on
(``ModelPlan.set_profiling``): on one thread, or with ``--threads`` > 1 every
thread sharing each op (an op's time then ends when its slowest share does). Prints the ops in plan order with their share of
the time, then the total by kind of op; the sum of the ops against the call's
own median tells how much is outside them (the pooling head, the input copy).

torchvision's ``resnet18``, ``resnet50`` and ``mobilenet_v2`` are built as
``benchmarks/bench_paper_shapes.py`` builds them (``--size``, 224 by default;
variants ``dense``, ``dynet``, ``sdconv``, ``dynconv@<budget>``, ``odconv``,
all at the dense width). ``--onnxruntime`` also exports the model as the
latency stage does and runs it, batch 1, in ONNX Runtime with the pipeline's session
settings and its profiler on, ``--threads`` intra-op threads, and prints
its nodes in order with their median time and their total by operator: the
two lists, side by side with the same layer names, show which of the plan's
ops lose to which of the runtime's (ONNX Runtime names a fused conv by the
last op it absorbed, e.g. a ResNet conv by its ReLU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.bench_plan_archs import _images, build
from pipeline.ops.plan.builder import PlanBuilder


PAPER_ARCHS = ("resnet18", "resnet50", "mobilenet_v2")


def model_and_input(arch: str, variant: str, sparsity: float, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The BN-folded eval model of ``variant`` on ``arch`` and one input image."""
    if arch in PAPER_ARCHS:
        from benchmarks.bench_paper_shapes import build as build_paper
        from benchmarks.bench_paper_shapes import images

        return build_paper({"variant": variant, "arch": arch}, size, sparsity)[0], images(1, size)
    return build(arch, variant, sparsity)[0], _images(1)


def profile(arch: str, variant: str, calls: int, sparsity: float = 0.8, threads: int = 1,
            size: int = 224) -> tuple[list[tuple[str, float]], float]:
    """([(op label, seconds per call)] in plan order, median seconds of a whole call) on ``threads`` threads
    sharing each image."""
    from pipeline.ops.plan.builder import plan_hook

    model, x = model_and_input(arch, variant, sparsity, size)
    torch.set_num_threads(threads)
    b = PlanBuilder(tuple(x.shape[1:]))
    with torch.no_grad():
        plan_hook(model)(b)
    plan = b.plan
    plan.set_team_policy(2 if threads > 1 else 1)
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


def onnxruntime_nodes(arch: str, variant: str, calls: int, sparsity: float, threads: int,
                      size: int) -> tuple[list[tuple[str, str, float]], float]:
    """([(node name, operator, median seconds)] in run order, median seconds of a whole call) of the model in
    ONNX Runtime with the pipeline's session settings and the runtime's profiler on."""
    import onnxruntime as ort

    from pipeline.runtimes import export_onnx

    model, x = model_and_input(arch, variant, sparsity, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", x)
        options = ort.SessionOptions()  # pipeline/runtimes.py's settings, with the profiler on
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(20):
            session.run(None, feed)
        whole = []
        for _ in range(calls):
            t = time.perf_counter()
            session.run(None, feed)
            whole.append(time.perf_counter() - t)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            nodes[name].append(e["dur"] / 1e6)
            ops[name] = e["args"].get("op_name", "?")
    return [(n, ops[n], statistics.median(d[20:] or d)) for n, d in nodes.items()], statistics.median(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cifar_mobilenetv2")
    parser.add_argument("--variant", default="dense", help="dense or a method of convert")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=0, help="print only the N slowest ops (0: all, in order)")
    parser.add_argument("--sdconv-sparsity", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help="threads sharing each image")
    parser.add_argument("--size", type=int, default=224, help=f"image size of {', '.join(PAPER_ARCHS)}")
    parser.add_argument("--onnxruntime", action="store_true", help="also ONNX Runtime's nodes, profiled")
    args = parser.parse_args()
    ops, whole = profile(args.arch, args.variant, args.calls, args.sdconv_sparsity, args.threads, args.size)
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
    if args.onnxruntime:
        nodes, ort_whole = onnxruntime_nodes(args.arch, args.variant, args.calls, args.sdconv_sparsity,
                                             args.threads, args.size)
        ort_total = sum(t for _, _, t in nodes)
        print(f"ONNX Runtime: one call {ort_whole * 1e3:.3f} ms (median of {args.calls}), nodes {ort_total * 1e3:.3f} "
              f"ms; the plan's call / ONNX Runtime's: {whole / ort_whole:.2f}")
        for name, op, t in nodes:
            print(f"{t * 1e6:9.1f} us {100 * t / ort_total:5.1f} %  {op:18s} {name}")
        by_op: dict[str, float] = defaultdict(float)
        for _, op, t in nodes:
            by_op[op] += t
        print("by operator:")
        for op, t in sorted(by_op.items(), key=lambda k: -k[1]):
            print(f"{t * 1e6:9.1f} us {100 * t / ort_total:5.1f} %  {op}")


if __name__ == "__main__":
    main()
