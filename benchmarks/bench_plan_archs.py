"""Every method's model in the compiled plan against the fastest dense runtime, per backbone, untrained.

    python -m benchmarks.bench_plan_archs [--arch cifar_resnet,cifar_mobilenetv2] [--processes 3]
                                          [--iterations 60] [--warmup 10] [--threads 0]

Timing needs no training: each backbone of ``model.arch`` (params.yaml's model
settings otherwise) is built from a seeded random init with BatchNorm
statistics set so activations stay in range, and every method of
``convert`` is built from it with its own params (``Method.build``: DyNet's
and ODConv's widths and kernel counts, ...). What training would set is set
by hand: SD-Conv's pruned weights (``--sdconv-sparsity`` of every mixed
kernel's weights zero, at random) and DynConv's masks (random mask units,
each bias set so that its block executes the method's ``budget`` of its
dense MACs on the timing images, the sparsity criterion's cost: conv1 at the
dilated mask, the other convs at the mask; in spatially coherent regions
since the logits come from a 3x3 conv of the features).

Each variant (BN folded; the methods in the compiled plan where it takes
them, the row's ``runtime`` saying which layer stopped it otherwise) and the
dense model in PyTorch eager, ONNX Runtime and OpenVINO (f32, each at its own
settings, ``pipeline/runtimes.py``) and in the compiled plan runs alone in a
process of its own, ``--processes`` sessions in alternating order, at batch
1 and ``latency.batch_size``. Prints per row the median over sessions, the
ratio to the fastest dense runtime of the same run (geometric mean over
sessions, with its 95 % interval), the executed MACs per image and the
largest deviation of the timed output from the PyTorch model's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline import methods, stats
from pipeline.complexity import count_macs
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.fold import fold_batchnorm
from pipeline.models import build_model, model_cfg
from pipeline.ops.odconv import ODConv2d
from pipeline.ops.plan import PlannedModel, plan_or_reason
from pipeline.ops.sd_conv import SDConv2d
from pipeline.ops.sparse_exec import to_sparse_execution
from pipeline.ops.spatial_gate import GatedBlock, gated_blocks
from pipeline.paths import repo_root
from pipeline.runtimes import compile_dense, export_onnx
from pipeline.timing import time_blocks, torch_threads, tune_malloc

RUNTIMES = ("onnxruntime", "openvino")
SEED = 0
SHAPE = (3, 32, 32)
CLASSES = 10


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Running statistics and affine parameters of every BatchNorm near those of a trained net."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.0, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)


def _images(n: int = 64, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(SEED + 1))


def backbone_cfg(cfg, arch: str):
    """params.yaml's model settings for backbone ``arch`` (a torchvision arch from random init)."""
    if arch == cfg.model.arch:
        return cfg.model
    if arch.startswith("cifar_"):
        return cfg.model.model_copy(update={"arch": arch})
    return model_cfg({"arch": arch, "width": 1.0, "weights": None})


def _threshold_for(block: GatedBlock, logits: torch.Tensor, budget: float) -> float:
    """The logit threshold at which ``block`` executes at most ``budget`` of its dense MACs on these images
    (DynConv's cost: the dilated mask's positions times ``dilated_cost`` plus the mask's times ``masked_cost``,
    ``GatedBlock.executed_cost``), as close to it as the images allow; bisection, the fraction falls as the
    threshold rises."""
    dense = logits.shape[0] * block.dense_cost_per_image

    def fraction(t: float) -> float:
        mask = (logits >= t).to(logits.dtype)
        dilated = block.dilate_mask(mask, block.in_size)
        return float(dilated.sum() * block.dilated_cost + mask.sum() * block.masked_cost) / dense

    lo, hi = float(logits.min()) - 1.0, float(logits.max()) + 1.0  # fraction(lo) = 1, fraction(hi) = 0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(mid) > budget else (lo, mid)
    # Midway between the logits on either side (the same masks on these images): a threshold on a logit would
    # leave that position's decision to the last bit, which the compiled plan and PyTorch may round apart.
    values = logits.flatten().unique()
    below, above = values[values < hi], values[values >= hi]
    return float((below.max() + above.min()) / 2) if len(below) and len(above) else hi


def _set_masks(model: nn.Module, images: torch.Tensor, gen: torch.Generator, budget: float) -> None:
    """Random mask-unit weights, each gated block's bias set so that it executes ``budget`` of its dense MACs
    on ``images`` (the sparsity criterion's cost: conv1 at the dilated mask, the rest at the mask), in
    spatially coherent regions since the logits come from a 3x3 conv of the features."""
    blocks = gated_blocks(model)
    with torch.no_grad():
        for b in blocks:
            u = b.gate
            u.conv.weight.normal_(0.0, 0.3, generator=gen)
            u.conv.bias.zero_()
            u.fc.weight.normal_(0.0, 0.1, generator=gen)
            u.fc.bias.zero_()
        for b in blocks:  # in order: each threshold sees the masks of the blocks before it
            model(images)
            b.gate.conv.bias.sub_(_threshold_for(b, b.gate.last_logits, budget))


def set_untrained(model: nn.Module, gen: torch.Generator, sparsity: float) -> None:
    """What training would set, set by hand (eval mode after): BatchNorm statistics, ODConv attentions that vary
    with the input, SD-Conv's pruned weights (``sparsity`` of them zero, the thresholds keeping the others)."""
    _randomize_bn(model, gen)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ODConv2d):
                for head in m.heads.values():
                    head.weight.normal_(0.0, 0.3, generator=gen)
            if isinstance(m, SDConv2d):
                m.weight.mul_(torch.rand(m.weight.shape, generator=gen) >= sparsity)
                m.threshold.zero_()


def build(arch: str, variant: str, sparsity: float, shape: tuple[int, int, int] = SHAPE, classes: int = CLASSES,
          overrides: dict | None = None) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """(the timed model, the model the MAC counter reads) of ``variant`` (``dense`` or a method of
    ``convert``) on backbone ``arch`` for inputs [B, *shape], SD-Conv with ``sparsity`` of its weights zero and
    ``overrides`` replacing the method's params (e.g. ``{"width": 1.0}``); deterministic."""
    cfg = load_config(repo_root() / "params.yaml")
    mcfg = backbone_cfg(cfg, arch)
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    dense = build_model(mcfg, shape[0], classes)
    _randomize_bn(dense, gen)
    if variant == "dense":
        dense.eval()
        return fold_batchnorm(dense)[0], dense
    method = methods.get(variant)
    params = method.params(cfg)
    if overrides:
        params = params.model_copy(update=overrides)
    model, _ = method.build(mcfg, params, shape[0], classes, SEED, dense=dense)
    set_untrained(model, gen, sparsity)
    if gated_blocks(model):
        budget = getattr(params, "budget", None)
        if budget is None:
            raise UserError(f"{variant}: gated blocks but no `budget` param to set their masks at")
        _set_masks(model, _images(8, shape), gen, budget)
        source = model
        model = to_sparse_execution(model)
    else:
        source = model
    return fold_batchnorm(model)[0], source



def worker(arch: str, variant: str, runtime: str | None, threads: int, batches: list[int], iterations: int,
           warmup: int, sparsity: float) -> dict:  # fmt: skip
    """Timings of one variant alone in this process, and its largest deviation from the PyTorch model."""
    tune_malloc()
    model, _ = build(arch, variant, sparsity)
    reason = None
    images = _images()
    rows = []
    with torch_threads(threads) as used, tempfile.TemporaryDirectory() as tmp:
        compiled = None
        timed = model
        if runtime in RUNTIMES:
            compiled = compile_dense(runtime, export_onnx(model, Path(tmp) / "m.onnx", images[:1]), used, model)
        elif runtime == "native":
            timed = PlannedModel(model)
        elif variant != "dense":
            timed, reason = plan_or_reason(model)
        for batch in batches:
            xs = [images[(torch.arange(batch) + i * batch) % len(images)] for i in range(iterations + warmup)]
            with torch.inference_mode():
                ref = model(xs[0])
                if compiled is not None:
                    arrays = [x.numpy() for x in xs]
                    got = torch.from_numpy(compiled.run(arrays[0]))
                    call = lambda i, run=compiled.run: run(arrays[i])  # noqa: E731
                else:
                    got = timed(xs[0])
                    call = lambda i: timed(xs[i])  # noqa: E731
                diff = float((got - ref).abs().max() / ref.abs().max())
                t = time_blocks({"x": call}, iterations, warmup, torch.device("cpu"))["x"]
            engine = runtime or ("native" if isinstance(timed, PlannedModel) else "pytorch")
            if reason:
                engine = f"pytorch (plan stopped at {reason})"
            rows.append({"batch": batch, "threads": used, "runtime": engine, "median_ms": t.median_ms,
                         "max_rel_diff": diff})  # fmt: skip
    return {"rows": rows}


def run_worker(job: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_plan_archs", "--worker", job, "--threads", str(args.threads),
           "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--batches", args.batches,
           "--sdconv-sparsity", str(args.sdconv_sparsity)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root())
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cifar_resnet,cifar_mobilenetv2", help="backbones, comma-separated")
    parser.add_argument("--processes", type=int, default=3, help="sessions: processes per variant")
    parser.add_argument("--iterations", type=int, default=60, help="timed calls per process and batch (>= 30)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = all cores)")
    parser.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 1 and "
                        "latency.batch_size)")  # fmt: skip
    parser.add_argument("--sdconv-sparsity", type=float, default=0.8, help="fraction of SD-Conv's weights zeroed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = load_config(repo_root() / "params.yaml")
    args.batches = args.batches or f"1,{cfg.latency.batch_size}"
    if args.worker:
        arch, variant, runtime = (args.worker.split(":") + [""])[:3]
        print(json.dumps(worker(arch, variant, runtime or None, args.threads, [int(b) for b in args.batches.split(",")],
                                args.iterations, args.warmup, args.sdconv_sparsity)))  # fmt: skip
        return
    if args.processes < 1 or args.iterations < 30:
        parser.error("--processes >= 1 and --iterations >= 30")
    method_names = list(cfg.convert)
    for arch in args.arch.split(","):
        jobs = [f"{arch}:dense:", f"{arch}:dense:native", *[f"{arch}:dense:{rt}" for rt in RUNTIMES],
                *[f"{arch}:{m}:" for m in method_names]]  # fmt: skip
        macs = {}
        for job in list(jobs):
            _, variant, _ = job.split(":")
            if variant not in macs:
                try:
                    macs[variant] = count_macs(build(arch, variant, args.sdconv_sparsity)[1], _images(8))
                except UserError as err:  # a method that does not take this backbone
                    print(f"{arch}: {variant} left out: {err}")
                    jobs.remove(job)
        t0 = time.perf_counter()
        sessions: dict[str, list[dict]] = {job: [] for job in jobs}
        for s in range(args.processes):
            for job in (jobs if s % 2 == 0 else jobs[::-1]):
                sessions[job].append(run_worker(job, args))
        print(f"\n{arch}: {len(jobs)} processes x {args.processes} sessions in {time.perf_counter() - t0:.0f} s "
              f"({args.iterations} calls after {args.warmup} warm-up each; untrained, SD-Conv at "
              f"{args.sdconv_sparsity:g} sparsity, DynConv masks at its budget of the gated blocks' MACs)")
        print("\n| batch | variant | runtime | median (ms) | vs fastest dense [95 % over sessions] | MMACs/image "
              "| max rel. diff |\n|---|---|---|---|---|---|---|")
        for bi, batch in enumerate(int(b) for b in args.batches.split(",")):
            per = {job: [r["rows"][bi] for r in runs] for job, runs in sessions.items()}
            dense_jobs = [j for j in jobs if j.split(":")[1] == "dense"]
            fastest = min(dense_jobs, key=lambda j: statistics.median(r["median_ms"] for r in per[j]))
            for job in jobs:
                _, variant, _ = job.split(":")
                ratios = [d["median_ms"] / r["median_ms"] for d, r in zip(per[fastest], per[job])]
                logs = [math.log(q) for q in ratios]
                mean = math.exp(statistics.fmean(logs))
                interval = ""
                if len(logs) > 1:
                    _, lo, hi = stats.t_interval(logs, 0.95)
                    interval = f" [{math.exp(lo):.2f}, {math.exp(hi):.2f}]"
                mark = " (fastest dense)" if job == fastest else ""
                rows = per[job]
                print(f"| {batch} | {variant}{mark} | {rows[0]['runtime']} | "
                      f"{statistics.median(r['median_ms'] for r in rows):.3f} | {mean:.2f} x{interval} | "
                      f"{macs[variant] / 1e6:.2f} | {max(r['max_rel_diff'] for r in rows):.1e} |")


if __name__ == "__main__":
    main()
