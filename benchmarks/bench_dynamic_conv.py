"""Time a static conv, DynamicConv2d's batched path and its per-sample loop on CPU.

    python -m benchmarks.bench_dynamic_conv [--threads N] [--reps 20]

For a 64->64 3x3 conv (padding 1) at 16x16 and 32x32 (and 56x56, the first
stage of an ImageNet ResNet, for batch-1 inference): a training step (forward
+ backward to the input and the parameters) at batch 64, and inference
(forward under ``torch.inference_mode``) at batch 1 and 64. Prints
the median time per call over ``--reps`` repetitions after a warm-up; the
variants take turns within each repetition, and a repetition runs a step
several times when one call is under 5 ms.

Static baselines: ``nn.Conv2d`` and, for inference when the compiled kernels
are available (``pipeline/ops/native.py``), the same direct 3x3 conv that the
dynamic conv runs, with the static kernel ("direct"). ``dyn/static`` divides by
the faster of the two, so a faster conv kernel cannot pass for a cheap dynamic
conv. For training the direct baseline is the compiled training op with one
static kernel and coefficient 1 (``direct_conv3x3``: the same forward and
backward kernels without the mixing).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks import apply_timing_args, timing_args
from pipeline.timing import tune_malloc
from pipeline.ops import native
from pipeline.ops.dynamic_conv import DynamicConv2d, direct_conv3x3

CHANNELS = 64
# (mode, batch, map size)
CASES = (("train", 64, 16), ("train", 64, 32), ("infer", 1, 16), ("infer", 1, 32), ("infer", 1, 56),
         ("infer", 64, 16), ("infer", 64, 32))  # fmt: skip
# The project's bound on dynamic/static time, per mode.
TARGETS = {"train": 2.0, "infer": 1.3}


def calls_per_rep(fn: Callable[[], object], min_seconds: float = 0.005) -> int:
    """Calls per timed repetition so that sub-millisecond steps are not timed one by one."""
    start = time.perf_counter()
    fn()
    return max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))


def median_ms(steps: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median time per call of each step, in ms; the steps take turns so load changes hit all alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    numbers = {name: calls_per_rep(fn) for name, fn in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            times[name].append((time.perf_counter() - start) / numbers[name])
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


Forward = Callable[[torch.Tensor], torch.Tensor]


def train_step(forward: Forward, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        forward(x).backward(grad_out)

    return step


def infer_step(forward: Forward, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            forward(x)

    return step


def measure(mode: str, batch: int, size: int, reps: int, warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    static = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
    dynamic = DynamicConv2d(CHANNELS, CHANNELS, 3, padding=1, num_kernels=4, activation="softmax")
    x = torch.randn(batch, CHANNELS, size, size, requires_grad=mode == "train")
    grad_out = torch.randn(batch, CHANNELS, size, size)
    runs = {
        "static": (static, static.forward),
        "dynamic": (dynamic, dynamic.forward),
        "loop": (dynamic, dynamic.forward_reference),
    }
    steps = {
        name: train_step(forward, module, x, grad_out) if mode == "train" else infer_step(forward, x)
        for name, (module, forward) in runs.items()
    }
    compiled = native.load()
    if mode == "train" and compiled is not None and batch >= torch.get_num_threads():
        steps["static_direct"] = train_step(lambda inp: direct_conv3x3(inp, static.weight), static, x, grad_out)
    if mode == "infer" and compiled is not None:
        # The compiled direct 3x3 conv that DynamicConv2d runs, with the static kernel: a static baseline at
        # least as fast as the one the dynamic conv is built on.
        matrix = native.conv3x3_matrix(static.weight.detach())
        steps["static_direct"] = infer_step(lambda inp: compiled.conv3x3_direct(inp, matrix, None), x)
    return median_ms(steps, reps, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_args(parser, min_reps=20, default_reps=20)
    args = parser.parse_args(argv)
    apply_timing_args(parser, args, min_reps=20)
    malloc = "glibc keeps freed blocks (mallopt)" if tune_malloc() else "default malloc"

    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, CPU {cpu}, {torch.get_num_threads()} thread(s), median of {args.reps} "
          f"after {args.warmup} warm-up; {CHANNELS}->{CHANNELS} 3x3 pad 1, K=4 softmax; {malloc}")  # fmt: skip
    header = (f"{'case':<7}{'input':>14}{'static ms':>11}{'direct ms':>11}{'dynamic ms':>12}{'loop ms':>10}"
              f"{'dyn/static':>12}{'loop/dyn':>10}{'target':>9}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for mode, batch, size in CASES:
        t = measure(mode, batch, size, args.reps, args.warmup)
        best_static = min(t["static"], t.get("static_direct", float("inf")))
        ratio = t["dynamic"] / best_static
        verdict = f"{'<=' if ratio <= TARGETS[mode] else '>'}{TARGETS[mode]:g}"
        shape = f"{batch}x{CHANNELS}x{size}x{size}"
        direct = f"{t['static_direct']:>11.3f}" if "static_direct" in t else f"{'-':>11}"
        times = f"{t['static']:>11.3f}{direct}{t['dynamic']:>12.3f}{t['loop']:>10.3f}"
        ratios = f"{ratio:>12.2f}{t['loop'] / t['dynamic']:>10.2f}{verdict:>9}"
        print(f"{mode:<7}{shape:>14}{times}{ratios}", flush=True)


if __name__ == "__main__":
    main()
