"""The methods at the papers' own shapes: ResNet-18, ResNet-50 and MobileNetV2 at 224 x 224, untrained.

    python -m benchmarks.bench_paper_shapes [--arch resnet18,resnet50,mobilenet_v2] [--batches 1,8]
                                            [--threads 1,2] [--processes 3] [--iterations 20] [--warmup 3]
                                            [--size 224] [--json results.json]

Every number the pipeline produces is at 32 x 32; the papers' CPU claims are
at 224 x 224 (DyNet, OpenReview version: 1.87 x on MobileNetV2, 1.32 x on
ResNet-18, 1.48 x on ResNet-50 at FLOPs -56.7 / -68.2 / -72.4 %), where ONNX
Runtime and OpenVINO run their convolutions near the machine's GEMM peak.
Timing needs no training, so each model is a seeded random init with
BatchNorm statistics set so activations stay in range
(``benchmarks/bench_plan_archs.py`` does the same at 32 x 32):

- ``dense``: torchvision's network, in PyTorch eager, the compiled plan
  (``pipeline/ops/plan``), ONNX Runtime and OpenVINO (f32, a static-shape
  export per batch, each runtime's latency settings: ``pipeline/runtimes.py``);
- ``dynet``: every 3x3 conv but the stem a DyNet conv with K = 4 (softmax),
  on the backbone narrowed to the width whose MACs are the paper's FLOPs cut
  (bisected on the counted MACs; ResNets scale their four stage widths,
  MobileNetV2 its ``width_mult``);
- ``sdconv``: the same K and width, 80 % of every kernel's weights zero
  (``--sdconv-sparsity``);
- ``dynconv@0.25`` / ``dynconv@0.5`` (ResNets): every block gated, each mask
  unit's bias set so that its block executes the budget of its dense MACs on
  the timing images (spatially coherent masks: the logits are a 3x3 conv of
  the features), run by sparse execution;
- ``odconv``: ODConv x1 (one kernel with its spatial, input-channel and
  filter attentions; Li et al., ICLR 2022) at the dense width.

Each variant runs alone in a process of its own, ``--processes`` sessions in
alternating order per thread count. Per (threads, batch) the table gives the
median over sessions, the ratio to the fastest dense runtime of the same run
(geometric mean over sessions, with its 95 % interval), the executed MACs per
image, the executed G MAC/s and its share of the GEMM peak measured in the
same run (``torch.mm`` of 2048 x 2048 float32 matrices at the same thread
count, in a process of its own), the runtime that ran it (for a model the plan
does not take whole: the layer that stopped it), and the largest deviation of
its outputs from the PyTorch model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from benchmarks.bench_plan_archs import SEED, _randomize_bn, _set_masks, set_untrained
from pipeline import methods, stats
from pipeline.complexity import count_macs
from pipeline.models import narrow_resnet
from pipeline.config import load_config
from pipeline.fold import fold_batchnorm
from pipeline.ops.plan import PlannedModel, plan_or_reason
from pipeline.ops.sparse_exec import to_sparse_execution
from pipeline.ops.spatial_gate import gated_blocks
from pipeline.paths import repo_root
from pipeline.runtimes import compile_dense
from pipeline.timing import time_blocks, torch_threads, tune_malloc

CLASSES = 1000
# DyNet's FLOPs cut per backbone, OpenReview version (the version that reports the CPU speed-ups).
DYNET_FLOPS_CUT = {"mobilenet_v2": 0.567, "resnet18": 0.682, "resnet50": 0.724}
DYNET_SPEEDUP = {"mobilenet_v2": 1.87, "resnet18": 1.32, "resnet50": 1.48}
RESNETS = ("resnet18", "resnet50")
DENSE_RUNTIMES = ("pytorch", "native", "onnxruntime", "openvino")


def backbone(arch: str, width: float) -> nn.Module:
    """torchvision's ``arch`` with its channels scaled by ``width`` (divisible by 8), random init."""
    if arch == "mobilenet_v2":
        return tvm.mobilenet_v2(num_classes=CLASSES, width_mult=width)
    if arch not in RESNETS:
        raise SystemExit(f"--arch: unknown backbone {arch!r}; known: {', '.join(['mobilenet_v2', *RESNETS])}")
    return narrow_resnet(arch, width, CLASSES)


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(SEED + 1))


def build(job: dict, size: int, sparsity: float) -> tuple[nn.Module, nn.Module]:
    """(the timed model, BN folded; the model the MAC counter reads) of a job's variant; deterministic."""
    variant, arch = job["variant"], job["arch"]
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    dense = backbone(arch, job.get("width", 1.0))
    _randomize_bn(dense, gen)
    if variant == "dense":
        dense.eval()
        return fold_batchnorm(dense)[0], dense
    name = variant.split("@")[0]
    method = methods.get(name)
    cfg = load_config(repo_root() / "params.yaml")
    update: dict = {"width": 1.0}  # the backbone above is already narrowed
    if name == "odconv":  # ODConv x1: one kernel, so no kernel attention
        update.update(num_kernels=1, attentions=["spatial", "channel", "filter"])
    if name == "dynconv":
        update = {"budget": float(variant.split("@")[1])}
    params = method.params(cfg).model_copy(update=update)
    model = copy.deepcopy(dense)
    method.convert(model, params, SEED)
    set_untrained(model, gen, sparsity)
    if gated_blocks(model):
        _set_masks(model, images(4, size), gen, params.budget)
        return fold_batchnorm(to_sparse_execution(model))[0], model
    return fold_batchnorm(model)[0], model


def dynet_width(arch: str, size: int) -> tuple[float, float]:
    """(width, MAC ratio): the narrowing whose DyNet model's MACs are closest to the paper's FLOPs cut of the
    dense model, bisected (MACs grow with the width)."""
    x = images(1, size)
    target = 1.0 - DYNET_FLOPS_CUT[arch]
    dense = count_macs(build({"arch": arch, "variant": "dense"}, size, 0.0)[1], x)

    def ratio(w: float) -> float:
        return count_macs(build({"arch": arch, "variant": "dynet", "width": w}, size, 0.0)[1], x) / dense

    lo, hi = 0.2, 1.0
    for _ in range(7):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda w: abs(ratio(w) - target))
    return best, ratio(best)


def export_static(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """ONNX export with every shape fixed (the batch too): each runtime plans for exactly that shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["images"],
                          output_names=["logits"], opset_version=17)  # fmt: skip
    return path


def gemm_peak(threads: int, n: int = 2048, calls: int = 20) -> float:
    """G MAC/s of ``torch.mm`` on n x n float32 matrices (median call) at ``threads`` threads."""
    with torch_threads(threads):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        seconds = []
        for _ in range(calls):
            t = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - t)
    return n**3 / statistics.median(seconds) / 1e9


def worker(job: dict, batches: list[int], iterations: int, warmup: int, size: int, sparsity: float) -> dict:
    """Timings of one variant alone in this process, and its largest deviation from the PyTorch model."""
    tune_malloc()
    if job["variant"] == "gemm":
        return {"gmacs": gemm_peak(job["threads"])}
    model, _ = build(job, size, sparsity)
    runtime = job.get("runtime")
    rows = []
    with torch_threads(job["threads"]) as used, tempfile.TemporaryDirectory() as tmp:
        engine, timed = runtime, model
        if runtime == "native":
            timed = PlannedModel(model)
        elif runtime is None:
            timed, reason = plan_or_reason(model)
            engine = "native" if reason is None else f"pytorch (plan stopped at {reason})"
        for batch in batches:
            xs = [images(batch, size) + 0.01 * i for i in range(2)]
            with torch.inference_mode():
                ref = model(xs[0])
                if runtime in ("onnxruntime", "openvino"):
                    path = export_static(model, Path(tmp) / f"b{batch}.onnx", xs[0])
                    compiled = compile_dense(runtime, path, used, model)
                    arrays = [x.numpy() for x in xs]
                    got = torch.from_numpy(compiled.run(arrays[0]))
                    call = lambda i, run=compiled.run: run(arrays[i % 2])  # noqa: E731
                else:
                    got = timed(xs[0])
                    call = lambda i: timed(xs[i % 2])  # noqa: E731
                diff = float((got - ref).abs().max() / ref.abs().max())
                t = time_blocks({"x": call}, iterations, warmup, torch.device("cpu"))["x"]
            rows.append({"batch": batch, "threads": used, "runtime": engine, "median_ms": t.median_ms,
                         "max_rel_diff": diff})  # fmt: skip
    return {"rows": rows}


def run_worker(job: dict, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_paper_shapes", "--worker", json.dumps(job), "--batches",
           args.batches, "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--size",
           str(args.size), "--sdconv-sparsity", str(args.sdconv_sparsity)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root())
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(job: dict) -> str:
    return job["variant"] + (f" ({job['runtime']})" if job.get("runtime") else "")


def report(arch: str, threads: int, batches: list[int], jobs: list[dict], sessions: dict, macs: dict,
           peak: list[float]) -> list[dict]:  # fmt: skip
    """Print one table per batch; the rows as dicts."""
    peak_gmacs = statistics.median(peak)
    out = []
    for bi, batch in enumerate(batches):
        print(f"\n{arch}, {threads} thread(s), batch {batch} (GEMM peak {peak_gmacs:.1f} G MAC/s, median of "
              f"{len(peak)} processes)\n\n| variant | runtime | median (ms) | vs fastest dense [95 % over sessions] "
              "| G MACs/image | G MAC/s | of GEMM peak | max rel. diff |\n|---|---|---|---|---|---|---|---|")
        per = {label(j): [r["rows"][bi] for r in sessions[label(j)]] for j in jobs}
        dense = [label(j) for j in jobs if j["variant"] == "dense"]
        fastest = min(dense, key=lambda k: statistics.median(r["median_ms"] for r in per[k]))
        for job in jobs:
            key = label(job)
            rows = per[key]
            median = statistics.median(r["median_ms"] for r in rows)
            logs = [math.log(d["median_ms"] / r["median_ms"]) for d, r in zip(per[fastest], rows)]
            mean = math.exp(statistics.fmean(logs))
            interval = ""
            if len(logs) > 1:
                _, lo, hi = stats.t_interval(logs, 0.95)
                interval = f" [{math.exp(lo):.2f}, {math.exp(hi):.2f}]"
            gmacs = macs[job["variant"]] * batch / (median / 1e3) / 1e9
            mark = " (fastest dense)" if key == fastest else ""
            print(f"| {job['variant']}{mark} | {rows[0]['runtime']} | {median:.2f} | {mean:.2f} x{interval} | "
                  f"{macs[job['variant']] / 1e9:.3f} | {gmacs:.1f} | {100 * gmacs / peak_gmacs:.0f} % | "
                  f"{max(r['max_rel_diff'] for r in rows):.1e} |")
            out.append({"arch": arch, "threads": threads, "batch": batch, "variant": job["variant"],
                        "runtime": rows[0]["runtime"], "median_ms": median, "vs_fastest_dense": mean,
                        "gmacs_per_image": macs[job["variant"]] / 1e9, "gmac_per_s": gmacs,
                        "gemm_peak": peak_gmacs, "max_rel_diff": max(r["max_rel_diff"] for r in rows)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18,resnet50,mobilenet_v2", help="backbones, comma-separated")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    parser.add_argument("--processes", type=int, default=3, help="sessions: processes per variant")
    parser.add_argument("--iterations", type=int, default=20, help="timed calls per process and batch (>= 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--sdconv-sparsity", type=float, default=0.8, help="fraction of SD-Conv's weights zeroed")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), batches, args.iterations, args.warmup, args.size,
                                args.sdconv_sparsity)))  # fmt: skip
        return
    if args.processes < 1 or args.iterations < 10 or args.size < 32:
        parser.error("--processes >= 1, --iterations >= 10 and --size >= 32")
    results = []
    for arch in args.arch.split(","):
        width, ratio = dynet_width(arch, args.size)
        print(f"{arch}: DyNet width {width:.3f} executes {ratio:.3f} of the dense MACs (paper: FLOPs "
              f"-{100 * DYNET_FLOPS_CUT[arch]:.1f} %, CPU speed-up {DYNET_SPEEDUP[arch]} x)")
        variants = [{"variant": "dense", "runtime": rt} for rt in DENSE_RUNTIMES]
        variants += [{"variant": "dynet", "width": width}, {"variant": "sdconv", "width": width}]
        if arch in RESNETS:
            variants += [{"variant": "dynconv@0.25"}, {"variant": "dynconv@0.5"}]
        variants += [{"variant": "odconv"}]
        x = images(1, args.size)
        macs = {v["variant"]: count_macs(build({"arch": arch, **v}, args.size, args.sdconv_sparsity)[1], x)
                for v in variants}  # fmt: skip
        for threads in (int(t) for t in args.threads.split(",")):
            jobs = [{"arch": arch, "threads": threads, **v} for v in variants]
            sessions: dict[str, list[dict]] = {label(j): [] for j in jobs}
            peak = []
            t0 = time.perf_counter()
            for s in range(args.processes):
                peak.append(run_worker({"variant": "gemm", "threads": threads}, args)["gmacs"])
                for job in jobs if s % 2 == 0 else jobs[::-1]:
                    sessions[label(job)].append(run_worker(job, args))
            print(f"\n{arch}, {threads} thread(s): {len(jobs)} processes x {args.processes} sessions in "
                  f"{time.perf_counter() - t0:.0f} s ({args.iterations} calls after {args.warmup} warm-up each)")
            results += report(arch, threads, batches, jobs, sessions, macs, peak)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
