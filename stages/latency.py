"""Stage `latency`: MACs, parameters and measured latency of every model of the pipeline.

Usage: python -m stages.latency

Variants (all with BatchNorm folded, ``pipeline/fold.py``): the dense model,
timed in NCHW and in channels-last (the faster layout is the baseline,
``dense`` rows name the layout used), then every method's variants
(``Method.latency_variants``: e.g. DynConv computing densely and masking, the
same model with gather-scatter blocks, the searched model), methods in the
order of ``convert`` in params.yaml.

Per device (CPU; CUDA when present), thread count and batch size (1 and
``latency.batch_size``) the variants are timed interleaved on the same test
images (iteration i uses the i-th batch), after a warm-up. Each variant's
test accuracy is measured too, so a speed-up never hides an accuracy change.
On the CPU the dynamic-conv layers and the sparse blocks run the compiled
inference kernels (``pipeline/ops/native.py``); which build ran is recorded
(``native_kernels``).
"""

from __future__ import annotations

import json
import platform

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
from pipeline.paths import RESULTS
from pipeline.timing import resolve_threads, time_interleaved, torch_threads, tune_malloc
from pipeline.tracking import stage_run, write_run_info
from pipeline.train import Normalizer, evaluate, normalized

OUT = RESULTS / "latency"


def variants(cfg: Config) -> list[Variant]:
    """What the stage times: the baseline first, then every method's variants in params order."""
    return [v for method in methods.in_pipeline(cfg) for v in method.latency_variants()]


def build_variants(cfg: Config) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, float]]:
    """Eval-mode, BN-folded models by variant name; the models as their stage saved them (what the
    MAC counters understand: a sparse variant executes what its dense-masked source counts);
    and the test accuracy each had in its stage."""
    models: dict[str, nn.Module] = {}
    sources: dict[str, nn.Module] = {}
    recorded: dict[str, float] = {}
    for v in variants(cfg):
        if not v.file.is_file():
            raise UserError(f"'{v.file}' not found: run the stages before latency (dvc repro)")
        model, record, _ = load_any_model(v.file)
        sources[v.name] = model.eval()
        timed = v.transform(model) if v.transform else model
        models[v.name] = fold_batchnorm(timed)[0]
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


def measure_latency(cfg: Config, models: dict[str, nn.Module], images: torch.Tensor) -> list[dict]:
    """Rows of timings per (device, threads, batch, variant); the baseline also in channels-last."""
    lcfg = cfg.latency
    base = methods.baseline().name
    devices = [d for d in lcfg.devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        on_device = {k: m.to(device) for k, m in models.items()}
        threads_list = lcfg.threads if device_name == "cpu" else [0]
        for threads in dict.fromkeys(threads_list):
            with torch_threads(threads) as used:
                for batch in (1, lcfg.batch_size):
                    n = lcfg.iterations + lcfg.warmup
                    nchw = _inputs(images, batch, n, device)
                    last = [x.contiguous(memory_format=torch.channels_last) for x in nchw]
                    calls = {name: (lambda i, m=m: m(nchw[i])) for name, m in on_device.items()}
                    dense_cl = on_device[base].to(memory_format=torch.channels_last)
                    calls[f"{base}_channels_last"] = lambda i: dense_cl(last[i])
                    timings = time_interleaved(calls, lcfg.iterations, lcfg.warmup, device)
                    on_device[base].to(memory_format=torch.contiguous_format)
                    for name, t in timings.items():
                        rows.append({"variant": name, "device": device_name, "threads": used, "batch": batch,
                                     **t.as_dict(), "per_image_ms": t.median_ms / batch})  # fmt: skip
                    print(f"latency: {device_name} threads {used} batch {batch}: "
                          + ", ".join(f"{k} {v.median_ms:.2f} ms" for k, v in timings.items()), flush=True)
        for m in models.values():
            m.to("cpu")
    return rows


def add_speedups(rows: list[dict], complexity: dict[str, dict]) -> list[dict]:
    """Per (device, threads, batch): the best layout of the baseline becomes its row; speedups against it."""
    name = methods.baseline().name
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["threads"], r["batch"]), []).append(r)
    for key, group in groups.items():
        nchw = next(r for r in group if r["variant"] == name)
        cl = next(r for r in group if r["variant"] == f"{name}_channels_last")
        best = min((nchw, cl), key=lambda r: r["median_ms"])
        base = {**best, "variant": name, "layout": "channels_last" if best is cl else "nchw"}
        for r in [base, *[r for r in group if r is not nchw and r is not cl]]:
            c = complexity[r["variant"]]
            mac_speedup = complexity[name]["macs_per_image"] / c["macs_per_image"]
            speedup = base["median_ms"] / r["median_ms"]
            out.append({**r, "layout": r.get("layout", "nchw"), **c, "speedup_vs_dense": speedup,
                        "mac_speedup": mac_speedup, "realized_over_ideal": speedup / mac_speedup,
                        "dense_nchw_ms": nchw["median_ms"], "dense_channels_last_ms": cl["median_ms"]})  # fmt: skip
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
    with stage_run("latency", cfg) as run:
        rows = add_speedups(measure_latency(cfg, models, test_x), complexity)
        cpu = platform.processor() or platform.machine()
        result = {
            "torch": torch.__version__, "cpu": cpu, "cores": resolve_threads(0),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "iterations": cfg.latency.iterations, "warmup": cfg.latency.warmup, "malloc_tuned": malloc_tuned,
            "native_kernels": compiled.__name__ if compiled is not None else None,
            "rows": rows, "accuracy": accuracy, "complexity": complexity,
        }  # fmt: skip
        OUT.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
        flat = {}
        for r in rows:
            key = f"{r['variant']}.{r['device']}.t{r['threads']}.b{r['batch']}"
            flat.update({f"{key}.median_ms": r["median_ms"], f"{key}.iqr_ms": r["iqr_ms"],
                         f"{key}.speedup_vs_dense": r["speedup_vs_dense"]})  # fmt: skip
        for name, a in accuracy.items():
            flat.update({f"{name}.test_acc": a["test_acc"], f"{name}.acc_change": a["acc_change"],
                         f"{name}.macs_per_image": complexity[name]["macs_per_image"]})  # fmt: skip
        summary = headline(rows, accuracy)
        write_metrics(OUT / "metrics.json", summary)
        run.log_metrics(flat, prefix="latency.")
        run.log_metrics(summary, prefix="final.")
        run.set_tags({"cpu": cpu, "cuda": result["cuda"] or "none", "native_kernels": result["native_kernels"] or "none"})
        run.log_artifact(RESULTS / "latency.json")
        run.log_dataset("upstream", read_card(), "evaluation")
        write_run_info(OUT / "run.json", run, "latency")
    print("latency: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


def headline(rows: list[dict], accuracy: dict[str, dict]) -> dict[str, float]:
    """The numbers the claims are checked on: CPU, all cores, batch 1 (and the batch size)."""
    base = methods.baseline().name
    cpu = [r for r in rows if r["device"] == "cpu"]
    most = max(r["threads"] for r in cpu)
    out = {}
    for r in cpu:
        if r["threads"] == most and r["variant"] != base:
            out[f"{r['variant']}_speedup_b{r['batch']}"] = r["speedup_vs_dense"]
    out.update({f"{name}_acc_change": a["acc_change"] for name, a in accuracy.items() if name != base})
    out["threads"] = float(most)
    return out


if __name__ == "__main__":
    run_stage("latency", main, __doc__)
