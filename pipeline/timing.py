"""Timing harness: warm-up, repetitions, median and inter-quartile range.

``time_interleaved`` lets variants take turns call by call (``A B C A B C
...``), so a change in machine load hits all of them alike; ``time_blocks``
times each variant in a block of its own (``A A A B B B ...``), as a deployed
model runs, with its weights in the caches and no other thread pool waking up
between its calls (the latency stage's choice). On CUDA every call is
synchronised before the clock stops.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 4 << 30) -> bool:
    """Keep freed blocks of up to ``mmap_threshold`` bytes in the process (glibc only).

    By default glibc serves large blocks with fresh ``mmap`` pages and hands
    freed memory back to the OS, so a layer whose buffers are a few hundred KB
    page-faults on every call and its time drifts with the allocator's state
    (2-3x measured here). Every variant timed in the process benefits alike.
    Returns whether the settings took effect.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    except (OSError, AttributeError):
        return False


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    iterations: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def as_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms, "iqr_ms": self.iqr_ms,
                "iterations": float(self.iterations)}  # fmt: skip


def summarize(seconds: Sequence[float]) -> Timing:
    if len(seconds) < 4:
        raise ValueError(f"need at least 4 timed iterations for quartiles, got {len(seconds)}")
    ms = sorted(1e3 * s for s in seconds)
    q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return Timing(med, q1, q3, len(ms))


def resolve_threads(threads: int) -> int:
    """0 means every core this process may use."""
    if threads > 0:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def time_interleaved(
    calls: dict[str, Callable[[int], object]],
    iterations: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Timing]:
    """Time every ``calls[name](i)`` (``i`` = iteration index, e.g. to pick the input) in turns.

    ``warmup`` untimed rounds first; then ``iterations`` rounds in which each
    variant runs once, under ``torch.inference_mode``.
    """
    if iterations < 4 or warmup < 0:
        raise ValueError(f"iterations must be >= 4 and warmup >= 0, got {iterations} and {warmup}")
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for i in range(warmup):
            for fn in calls.values():
                fn(i)
        if cuda:
            torch.cuda.synchronize(device)
        for i in range(iterations):
            for name, fn in calls.items():
                start = time.perf_counter()
                fn(i)
                if cuda:
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


def time_blocks(
    calls: dict[str, Callable[[int], object]],
    iterations: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Timing]:
    """Time every ``calls[name](i)`` in a block of its own: ``warmup`` untimed calls, then ``iterations``
    timed ones, variant after variant."""
    out: dict[str, Timing] = {}
    for name, fn in calls.items():
        out.update(time_interleaved({name: fn}, iterations, warmup, device))
    return out
