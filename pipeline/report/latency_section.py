"""Report section of the latency stage: realized speed-up against the MAC-ratio speed-up."""

from __future__ import annotations

import json

import pandas as pd

from pipeline import methods
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
    if "runtime" not in rows:  # a result written before the runtime baselines
        rows["runtime"], rows["speedup_vs_eager"] = "pytorch", rows["speedup_vs_dense"]
    if "threads_per_image" not in rows:  # a result written before the plan chose its threads per image
        rows["threads_per_image"] = None
    if "speedup_lo" not in rows:  # a result of one session
        rows["speedup_lo"] = rows["speedup_hi"] = None
    rows["interval"] = [f"[{lo:.2f}, {hi:.2f}]" if lo is not None and lo == lo else "one session"
                        for lo, hi in zip(rows["speedup_lo"], rows["speedup_hi"])]
    table = rows[["device", "threads", "batch", "variant", "runtime", "threads_per_image", "layout", "median_ms",
                  "iqr_ms", "per_image_ms",
                  "MMACs/image", "mac_speedup", "speedup_vs_dense", "interval", "speedup_vs_eager", "realized_over_ideal", "test_acc"]]
    table = table.rename(columns={"threads_per_image": "threads / image", "median_ms": "median (ms)", "iqr_ms": "IQR (ms)", "per_image_ms": "per image (ms)",
                                  "mac_speedup": "MAC-ratio speed-up", "speedup_vs_dense": "speed-up vs best dense",
                                  "interval": "95 % over sessions",
                                  "speedup_vs_eager": "speed-up vs PyTorch eager",
                                  "realized_over_ideal": "realized / MAC ratio"})
    cpu = rows[rows["device"] == "cpu"]
    most = cpu["threads"].max()
    shown = cpu[cpu["threads"] == most]
    base = methods.baseline().name
    if f"{base}_pytorch" in set(shown["variant"]):  # the `dense` row repeats the fastest dense runtime's
        shown = shown[shown["variant"] != base]
    fig = figures.latency_vs_macs(shown, ctx.figures / "latency_vs_macs.png")
    gpu = f", GPU {result['cuda']}" if result["cuda"] else ", no GPU present (CUDA rows absent)"
    build = result.get("native_kernels")
    kernels = (f"On the CPU every model the compiled whole-model plan supports ran in it (runtime `native`: one "
               "call per batch, no Python between layers; with fewer images than threads it times, on its first "
               "call, the threads sharing each layer against one thread alone and keeps the faster: column "
               "threads / image); the others ran as PyTorch modules, their dynamic layers and sparse blocks on "
               f"the per-layer compiled kernels (build {build})."
               if build else "The compiled CPU kernels were not available: every model ran its PyTorch path.")
    checks = result.get("runtimes", {})
    if checks:
        named = "; ".join(f"{rt} {c['version']} (max abs difference from PyTorch's logits {c['max_abs_diff']:.1e})"
                          for rt, c in checks.items())
        runtimes = (
            f"The dense model also ran, on the CPU, in {named}: ONNX Runtime and OpenVINO on its ONNX export, "
            "`native` in the compiled plan that runs the methods, all f32 (OpenVINO's default on CPUs with bf16 "
            "instructions is bf16, another function) with intra-op threads = the thread count of the row, each "
            "with its own recommended settings (ONNX Runtime's threads spin between runs, as by default). The "
            "`dense` row is the fastest dense runtime of its setting (columns runtime and layout); "
            "`dense_pytorch` is PyTorch eager in its faster layout (NCHW or channels-last)."
        )
    else:
        runtimes = "The dense baseline is PyTorch eager in the faster of NCHW and channels-last (column layout)."
    k = result.get("timing_sessions", 1)
    text = (
        f"Measured on {result['cpu']} ({result['cores']} cores{gpu}), torch {result['torch']}: every model with "
        f"BatchNorm folded, every variant timed alone in a process of its own, as it is deployed, in {k} "
        f"timing session(s) of alternating order on the same test images; in each, {result['warmup']} warm-up "
        f"calls, then {result['iterations']} timed calls. Times are medians over the sessions of each session's "
        f"median (IQR likewise). {runtimes} MAC-ratio speed-up = dense MACs / model MACs; speed-up vs best "
        "dense = time of the fastest dense runtime / model time, session by session, as their geometric mean "
        "with a 95 % Student-t interval over sessions on the log scale (this machine's speed moves by a third "
        "from hour to hour, so one session is never taken as exact; the speed verdicts judge these per-session "
        "ratios); speed-up vs "
        f"PyTorch eager is the same against PyTorch's dense model. {kernels} MLflow run `{ev.run_ids['latency']}`."
    )
    fmt = {"median (ms)": "{:.3f}", "IQR (ms)": "{:.3f}", "per image (ms)": "{:.3f}", "MMACs/image": "{:.2f}",
           "MAC-ratio speed-up": "{:.2f}", "speed-up vs best dense": "{:.2f}", "speed-up vs PyTorch eager": "{:.2f}",
           "realized / MAC ratio": "{:.2f}",
           "test_acc": "{:.4f}", "threads": "{:.0f}", "batch": "{:.0f}", "threads / image": "{:.0f}"}
    blocks = [
        Text(text),
        Table(table, "Latency per setting; speed-ups against the fastest dense runtime of the same setting and against PyTorch eager.", "{:.4f}", fmt),
        Figure(fig, f"Latency per image against MACs per image (CPU, {most} threads)."),
    ]
    return Section("Latency", blocks)


SECTIONS.append(latency_section)
