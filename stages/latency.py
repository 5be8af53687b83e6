"""Stage `latency`: MACs, parameters and measured latency of every model of the pipeline.

Usage: python -m stages.latency

Variants (all with BatchNorm folded, ``pipeline/fold.py``): the dense model,
timed in PyTorch in NCHW and in channels-last and, on the CPU, in the runtimes
of ``latency.runtimes`` (ONNX Runtime, OpenVINO on its ONNX export; ``native``,
the compiled whole-model plan: ``pipeline/runtimes.py``, outputs checked
against PyTorch), then every method's variants, each in the compiled plan
where the plan supports the model (``pipeline/model_plan.py``; row
``runtime`` says which ran), (``Method.latency_variants``: e.g. DynConv computing densely and
masking, the same model with gather-scatter blocks, the searched model),
methods in the order of ``convert`` in params.yaml.

Per setting the fastest dense runtime is the baseline (the ``dense`` row names
it): every speed-up is against it; the speed-up against PyTorch eager (its
faster layout, row ``dense_pytorch``) is kept beside it.

Each variant is timed in a block of its own (warm-up, then the timed calls) on
the same inputs, one variant after the other, as a deployed model runs: call
by call interleaving evicted each model's weights and buffers from the caches
between its calls (DyNet at batch 1, 2 threads: about 1.08 ms interleaved
against 0.59 ms alone in a process), and a runtime's thread pool stays busy
after its call returns and slowed whatever ran next (OpenVINO in the rounds:
PyTorch's dense model 1.30 -> 1.65 ms, ONNX Runtime 0.31 -> 0.51 ms).

Per device (CPU; CUDA when present), thread count and batch size (1 and
``latency.batch_size``) the variants are timed on the same test images
(iteration i uses the i-th batch), after a warm-up. Each variant's
test accuracy is measured too, so a speed-up never hides an accuracy change.
On the CPU the models the plan does not support run their dynamic-conv layers
and sparse blocks on the per-layer compiled kernels (``pipeline/ops/native.py``);
which build ran is recorded (``native_kernels``).
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from pipeline import methods
from pipeline.cli import run_stage
from pipeline.complexity import count_macs, count_params
from pipeline.config import Config
from pipeline.data import load_task, read_card
from pipeline.errors import UserError
from pipeline.fold import fold_batchnorm
from pipeline.methods.base import Variant
from pipeline.methods.files import load_any_model
from pipeline.metrics import write_metrics
from pipeline.ops import native
from pipeline.model_plan import PlannedModel, planned
from pipeline.paths import RESULTS
from pipeline.runtimes import Compiled, compile_dense, export_onnx, max_abs_diff
from pipeline.timing import resolve_threads, time_blocks, torch_threads, tune_malloc
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Normalizer, evaluate, normalized

OUT = RESULTS / "latency"


def variants(cfg: Config) -> list[Variant]:
    """What the stage times: the baseline first, then every method's variants in params order."""
    return [v for method in methods.in_pipeline(cfg) for v in method.latency_variants()]


def build_variants(cfg: Config) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, float]]:
    """Eval-mode, BN-folded models by variant name, each method's variant in the compiled whole-model plan
    where the plan supports it (``pipeline/model_plan.py``; the dense model runs there as the ``native``
    runtime instead); the models as their stage saved them (what the MAC counters understand: a sparse
    variant executes what its dense-masked source counts); and the test accuracy each had in its stage."""
    models: dict[str, nn.Module] = {}
    sources: dict[str, nn.Module] = {}
    recorded: dict[str, float] = {}
    for v in variants(cfg):
        if not v.file.is_file():
            raise UserError(f"'{v.file}' not found: run the stages before latency (dvc repro)")
        model, record, _ = load_any_model(v.file)
        sources[v.name] = model.eval()
        timed = v.transform(model) if v.transform else model
        folded = fold_batchnorm(timed)[0]
        models[v.name] = folded if v.name == methods.baseline().name else planned(folded)
        recorded[v.name] = float(record["meta"]["metrics"]["test_acc"])
    return models, sources, recorded


def _inputs(images: torch.Tensor, batch: int, iterations: int, device: torch.device) -> list[torch.Tensor]:
    """``iterations`` batches cycling through the test images, on ``device``."""
    n = len(images)
    out = []
    for i in range(iterations):
        idx = torch.arange(i * batch, (i + 1) * batch) % n
        out.append(images[idx].to(device))
    return out


def measure_latency(cfg: Config, models: dict[str, nn.Module], images: torch.Tensor,
                    onnx: Path | None = None) -> tuple[list[dict], dict[str, dict]]:
    """Rows of timings per (device, threads, batch, variant); the baseline also in channels-last and, on the
    CPU, in every runtime of ``latency.runtimes`` (compiled from ``onnx``). Also each runtime's largest
    deviation from PyTorch's logits on the timed inputs, per thread count."""
    lcfg = cfg.latency
    base = methods.baseline().name
    devices = [d for d in lcfg.devices if d == "cpu" or torch.cuda.is_available()]
    rows, checks = [], {}
    for device_name in devices:
        device = torch.device(device_name)
        on_device = {k: m.to(device) for k, m in models.items()}
        threads_list = lcfg.threads if device_name == "cpu" else [0]
        for threads in dict.fromkeys(threads_list):
            with torch_threads(threads) as used:
                compiled: dict[str, Compiled] = {}
                if device_name == "cpu" and onnx is not None:
                    compiled = {rt: compile_dense(rt, onnx, used, on_device[base]) for rt in lcfg.runtimes}
                for batch in (1, lcfg.batch_size):
                    n = lcfg.iterations + lcfg.warmup
                    nchw = _inputs(images, batch, n, device)
                    last = [x.contiguous(memory_format=torch.channels_last) for x in nchw]
                    calls = {name: (lambda i, m=m: m(nchw[i])) for name, m in on_device.items()}
                    dense_cl = on_device[base].to(memory_format=torch.channels_last)
                    calls[f"{base}_channels_last"] = lambda i: dense_cl(last[i])
                    arrays = [x.numpy() for x in nchw] if compiled else []
                    for rt, c in compiled.items():
                        diff = max_abs_diff(c, on_device[base], nchw[:3])
                        check = checks.setdefault(rt, {"version": c.version, **c.settings, "max_abs_diff": 0.0})
                        check["max_abs_diff"] = max(check["max_abs_diff"], diff)
                        calls[f"{base}_{rt}"] = lambda i, run=c.run: run(arrays[i])
                    timings = time_blocks(calls, lcfg.iterations, lcfg.warmup, device)  # see the module docstring
                    on_device[base].to(memory_format=torch.contiguous_format)
                    for name, t in timings.items():
                        m = on_device.get(name)
                        engine = "native" if isinstance(m, PlannedModel) else "pytorch"
                        team = m.threads_per_image(nchw[0].shape[1:], used, batch) if engine == "native" else None
                        rows.append({"variant": name, "device": device_name, "threads": used, "batch": batch,
                                     "runtime": engine, "threads_per_image": team, **t.as_dict(),
                                     "per_image_ms": t.median_ms / batch})  # fmt: skip
                    print(f"latency: {device_name} threads {used} batch {batch}: "
                          + ", ".join(f"{k} {v.median_ms:.2f} ms" for k, v in timings.items()), flush=True)
        for m in models.values():
            m.to("cpu")
    return rows, checks


def add_speedups(rows: list[dict], complexity: dict[str, dict], runtimes: list[str] = ()) -> list[dict]:
    """Per (device, threads, batch): the fastest dense runtime becomes the ``dense`` row (``runtime`` and
    ``layout`` name it) and every speed-up is against it; ``dense_pytorch`` (PyTorch eager in its faster
    layout) and ``dense_<runtime>`` stay as rows, and ``speedup_vs_eager`` is the speed-up against
    PyTorch eager."""
    name = methods.baseline().name
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["threads"], r["batch"]), []).append(r)
    for group in groups.values():
        nchw = next(r for r in group if r["variant"] == name)
        cl = next(r for r in group if r["variant"] == f"{name}_channels_last")
        eager = min((nchw, cl), key=lambda r: r["median_ms"])
        layout = "channels_last" if eager is cl else "nchw"
        dense = [{**eager, "variant": f"{name}_pytorch", "runtime": "pytorch", "layout": layout}]
        for rt in runtimes:
            found = next((r for r in group if r["variant"] == f"{name}_{rt}"), None)
            if found is not None:
                dense.append({**found, "runtime": rt, "layout": "nchw"})
        best = min(dense, key=lambda r: r["median_ms"])
        baseline = {**best, "variant": name}
        timed_dense = {r["variant"] for r in dense} | {name, f"{name}_channels_last"}
        methods_rows = [{"runtime": "pytorch", **r, "layout": "nchw"} for r in group if r["variant"] not in timed_dense]
        for r in [baseline, *dense, *methods_rows]:
            c = complexity[name if r["variant"] in timed_dense else r["variant"]]
            mac_speedup = complexity[name]["macs_per_image"] / c["macs_per_image"]
            speedup = baseline["median_ms"] / r["median_ms"]
            out.append({**r, **c, "speedup_vs_dense": speedup, "speedup_vs_eager": eager["median_ms"] / r["median_ms"],
                        "mac_speedup": mac_speedup, "realized_over_ideal": speedup / mac_speedup,
                        "best_dense": best["runtime"], "dense_nchw_ms": nchw["median_ms"],
                        "dense_channels_last_ms": cl["median_ms"],
                        **{f"dense_{d['runtime']}_ms": d["median_ms"] for d in dense}})  # fmt: skip
    return out


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
        accuracy[f"{base}_pytorch"] = accuracy[base]
        for name in [f"{base}_pytorch", *[f"{base}_{rt}" for rt in cfg.latency.runtimes]]:
            complexity[name] = complexity[base]
        timed, checks = measure_latency(cfg, models, test_x, onnx)
        rows = add_speedups(timed, complexity, cfg.latency.runtimes)
        cpu = platform.processor() or platform.machine()
        result = {
            "torch": torch.__version__, "cpu": cpu, "cores": resolve_threads(0),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "iterations": cfg.latency.iterations, "warmup": cfg.latency.warmup, "malloc_tuned": malloc_tuned,
            "native_kernels": compiled.__name__ if compiled is not None else None,
            "runtimes": checks, "rows": rows, "accuracy": accuracy, "complexity": complexity,
        }  # fmt: skip
        OUT.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
        flat = {}
        for r in rows:
            key = f"{r['variant']}.{r['device']}.t{r['threads']}.b{r['batch']}"
            flat.update({f"{key}.median_ms": r["median_ms"], f"{key}.iqr_ms": r["iqr_ms"],
                         f"{key}.speedup_vs_dense": r["speedup_vs_dense"],
                         f"{key}.speedup_vs_eager": r["speedup_vs_eager"]})  # fmt: skip
        for name, a in accuracy.items():
            flat.update({f"{name}.test_acc": a["test_acc"], f"{name}.acc_change": a["acc_change"],
                         f"{name}.macs_per_image": complexity[name]["macs_per_image"]})  # fmt: skip
        summary = headline(rows, accuracy)
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


def headline(rows: list[dict], accuracy: dict[str, dict]) -> dict[str, float]:
    """The numbers the claims are checked on: CPU, all cores, batch 1 (and the batch size), against the
    fastest dense runtime (``_speedup_``) and against PyTorch eager (``_speedup_vs_eager_``)."""
    base = methods.baseline().name
    cpu = [r for r in rows if r["device"] == "cpu"]
    most = max(r["threads"] for r in cpu)
    out = {}
    for r in cpu:
        if r["threads"] == most and r["variant"] != base and not r["variant"].startswith(f"{base}_"):
            out[f"{r['variant']}_speedup_b{r['batch']}"] = r["speedup_vs_dense"]
            out[f"{r['variant']}_speedup_vs_eager_b{r['batch']}"] = r["speedup_vs_eager"]
    out.update({f"{name}_acc_change": a["acc_change"] for name, a in accuracy.items() if name != base})
    out["threads"] = float(most)
    return out


def runtime_accuracy(model: Compiled, split: tuple[torch.Tensor, torch.Tensor], norm: Normalizer,
                     batch_size: int) -> float:
    """Test accuracy of the dense model as a runtime computes it."""
    images, labels = split
    correct = 0
    for i in range(0, len(images), batch_size):
        x = norm(images[i : i + batch_size]).contiguous().numpy()
        correct += int((torch.from_numpy(model.run(x)).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


if __name__ == "__main__":
    run_stage("latency", main, __doc__)
