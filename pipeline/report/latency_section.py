"""Report section of the latency stage: realized speed-up against the MAC-ratio speed-up."""

from __future__ import annotations

import json

import pandas as pd

from pipeline.paths import RESULTS
from pipeline.report import figures
from pipeline.report.document import Figure, Section, Table, Text
from pipeline.report.sections import SECTIONS, Context


def latency_section(ctx: Context) -> Section | None:
    ev = ctx.evidence
    path = RESULTS / "latency.json"
    if not ev.has("latency") or not path.is_file():
        return None
    result = json.loads(path.read_text())
    rows = pd.DataFrame(result["rows"])
    acc = result["accuracy"]
    rows["test_acc"] = rows["variant"].map(lambda v: acc[v]["test_acc"])
    rows["MMACs/image"] = rows["macs_per_image"] / 1e6
    table = rows[["device", "threads", "batch", "variant", "layout", "median_ms", "iqr_ms", "per_image_ms", "MMACs/image",
                  "mac_speedup", "speedup_vs_dense", "realized_over_ideal", "test_acc"]]
    table = table.rename(columns={"median_ms": "median (ms)", "iqr_ms": "IQR (ms)", "per_image_ms": "per image (ms)",
                                  "mac_speedup": "MAC-ratio speed-up", "speedup_vs_dense": "realized speed-up",
                                  "realized_over_ideal": "realized / MAC ratio"})
    cpu = rows[rows["device"] == "cpu"]
    most = cpu["threads"].max()
    fig = figures.latency_vs_macs(cpu[cpu["threads"] == most], ctx.figures / "latency_vs_macs.png")
    gpu = f", GPU {result['cuda']}" if result["cuda"] else ", no GPU present (CUDA rows absent)"
    build = result.get("native_kernels")
    kernels = (f"On the CPU, DyNet / SD-Conv layers and the sparse DynConv blocks ran the compiled kernels ({build})."
               if build else "The compiled CPU kernels were not available: every model ran its PyTorch path.")
    text = (
        f"Measured on {result['cpu']} ({result['cores']} cores{gpu}), torch {result['torch']}: every model with "
        f"BatchNorm folded, all variants timed in one process and interleaved call by call on the same test "
        f"images, {result['warmup']} warm-up rounds, {result['iterations']} timed calls each; median and "
        "inter-quartile range. The dense baseline is the faster of NCHW and channels-last in each setting "
        "(column layout). MAC-ratio speed-up = dense MACs / model MACs; realized speed-up = dense time / model "
        f"time. {kernels} MLflow run `{ev.run_ids['latency']}`."
    )
    fmt = {"median (ms)": "{:.3f}", "IQR (ms)": "{:.3f}", "per image (ms)": "{:.3f}", "MMACs/image": "{:.2f}",
           "MAC-ratio speed-up": "{:.2f}", "realized speed-up": "{:.2f}", "realized / MAC ratio": "{:.2f}",
           "test_acc": "{:.4f}", "threads": "{:.0f}", "batch": "{:.0f}"}
    blocks = [
        Text(text),
        Table(table, "Latency per setting; speed-ups against the best dense layout of the same setting.", "{:.4f}", fmt),
        Figure(fig, f"Latency per image against MACs per image (CPU, {most} threads)."),
    ]
    return Section("Latency", blocks)


SECTIONS.append(latency_section)
