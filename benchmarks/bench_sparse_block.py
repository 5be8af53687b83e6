"""Time sparse (gather / scatter) DynConv blocks against the best dense block on CPU.

    python -m benchmarks.bench_sparse_block [--threads N] [--reps 30]

DynConv (Verelst & Tuytelaars, "Dynamic Convolutions: Exploiting Spatial
Sparsity for Faster Inference", CVPR 2020) runs a residual block's branch only
where its mask fires. For a MobileNetV2 inverted residual (32 channels, expand
6, 16x16 and 32x32 maps) and the basic blocks of the CIFAR ResNet-14 (16
channels at 32x32, 32 at 16x16, 64 at 8x8), at batch 1 and 32 and masks with
0.1 / 0.25 / 0.5 / 0.75 / 1.0 of the positions active, it times (inference,
``torch.inference_mode``):

- dense: the plain dense block (``InvertedResidual`` / ``BasicBlock``, eval, no
  mask) with every BN folded into its conv, on NCHW and on channels_last input;
  the faster of the two is the baseline;
- sparse: ``SparseInvertedResidual`` / ``SparseBasicBlock`` (same weights) on
  channels_last input (the layout sparse blocks hand on), its own mask unit
  included: ``forward(x)``, in the compiled engine (a one-block plan) and in its
  PyTorch reference (``use_native = False``).

Masks are spatially coherent: per image a seeded random centre and aspect ratio
(0.5 to 1.5), and the ``round(fraction * H * W)`` positions nearest to the
centre in that elliptical distance fire, i.e. one blob of exactly that size,
clipped by the border. The mask unit produces that mask from the input: channel
0 of the random input carries the mask's sign (+-(1 + |noise|)) and the unit
reads only its centre tap; the benchmark checks the realised mask and the
output against the dense-masked gated block.

Allocator: glibc returns freed blocks above a dynamic size to the OS, so a
block with multi-MB intermediates page-faults them in on every call and its
time drifts 2-3x within one process (measured here, dense and sparse alike).
Run as a script, the benchmark re-executes itself with ``MALLOC_ENV`` (mmap
threshold 32 MiB, no trimming) unless ``--keep-malloc`` is given.

Reports the median time per call over ``--reps`` repetitions after a warm-up;
the variants take turns within each repetition, and a repetition runs a step
several times when one call is under 5 ms. ``ideal`` = 1 / fraction is the
speedup of a free gather / scatter without mask unit; ``path`` is the engine that
ran the sparse block (``native`` unless the compiled kernels are unavailable).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from benchmarks import apply_timing_args, timing_args
from benchmarks.bench_dynamic_conv import median_ms
from pipeline.models.cifar_mobilenetv2 import InvertedResidual
from pipeline.models.cifar_resnet import BasicBlock
from pipeline.ops.sparse_exec import SparseBasicBlock, SparseInvertedResidual
from pipeline.ops.spatial_gate import GatedBasicBlock, GatedInvertedResidual

# (name, kind, channels, map size); kind "ir": MobileNetV2 inverted residual (expand 6), "basic": ResNet block.
BLOCKS = (
    ("mbv2-ir", "ir", 32, 16),
    ("mbv2-ir", "ir", 32, 32),
    ("resnet-basic", "basic", 16, 32),
    ("resnet-basic", "basic", 32, 16),
    ("resnet-basic", "basic", 64, 8),
)
BATCHES = (1, 32)
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
EXPAND = 6
# The project's targets: (kind, batch, active fraction) -> minimum realised speedup dense / sparse.
TARGETS = {
    ("ir", 1, 0.25): 2.0,
    ("ir", 32, 0.25): 1.5,
    ("basic", 1, 0.25): 1.5,
}
# At 100 % active the MobileNetV2 sparse block may be at most this much slower than dense (the basic block's
# 100 % rows are printed without a target, as the project states none for them).
FULL_SLOWDOWN = 1.2
# glibc hands freed blocks above a (dynamic) size back to the OS, so a block whose intermediates take a few
# MB page-faults them in again on every call; timings then drift 2-3x within one process (measured here).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def coherent_mask(batch: int, height: int, width: int, fraction: float, seed: int) -> torch.Tensor:
    """``[batch, 1, H, W]`` 0/1 mask: per image one elliptical blob of ``round(fraction * H * W)`` positions
    around a seeded random centre (aspect ratio 0.5 to 1.5), clipped by the border."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    active = round(fraction * height * width)
    y = torch.arange(height, dtype=torch.float64).view(-1, 1)
    x = torch.arange(width, dtype=torch.float64).view(1, -1)
    mask = torch.zeros(batch, height * width)
    for b in range(batch):
        cy, cx = (torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([height, width])).tolist()
        aspect = 0.5 + torch.rand((), generator=gen, dtype=torch.float64).item()
        distance = ((y - cy) ** 2 * aspect + (x - cx) ** 2 / aspect).flatten()
        mask[b, distance.argsort(stable=True)[:active]] = 1.0
    return mask.view(batch, 1, height, width)


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial eval BN statistics, so folding is exercised as in a trained network."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.weight.copy_(0.5 + torch.rand(n, generator=gen))
                bn.bias.copy_(torch.rand(n, generator=gen) - 0.5)
                bn.running_mean.copy_(0.6 * torch.rand(n, generator=gen) - 0.3)
                bn.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))


def folded_dense(block: nn.Module) -> nn.Module:
    """Copy of a dense eval block with every conv-BN pair fused (BNs become identities)."""
    block = copy.deepcopy(block).eval()
    pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    for conv_name, bn_name in pairs:
        if hasattr(block, conv_name) and hasattr(block, bn_name):
            setattr(block, conv_name, fuse_conv_bn_eval(getattr(block, conv_name), getattr(block, bn_name)))
            setattr(block, bn_name, nn.Identity())
    shortcut = getattr(block, "shortcut", None)
    if isinstance(shortcut, nn.Sequential):
        block.shortcut = nn.Sequential(fuse_conv_bn_eval(shortcut[0], shortcut[1]))
    return block


def _steer_gate(gated: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Make the block's mask unit fire exactly on ``mask``: it reads the centre tap of channel 0, which
    carries the mask's sign. Returns the modified input."""
    with torch.no_grad():
        gate = gated.gate
        gate.conv.weight.zero_()
        gate.conv.weight[0, 0, 1, 1] = 1.0
        gate.conv.bias.zero_()
        gate.fc.weight.zero_()
        gate.fc.bias.zero_()
        x = x.clone()
        x[:, 0] = torch.where(mask[:, 0] > 0, 1.0 + x[:, 0].abs(), -1.0 - x[:, 0].abs())
    return x


def _blocks(kind: str, channels: int, gen: torch.Generator) -> tuple[nn.Module, nn.Module]:
    if kind == "ir":
        dense = InvertedResidual(channels, channels, 1, EXPAND)
        gated_cls = GatedInvertedResidual
    else:
        dense = BasicBlock(channels, channels, 1)
        gated_cls = GatedBasicBlock
    _randomize_bn(dense, gen)
    dense.eval()
    return dense, gated_cls.from_block(dense).eval()


def measure_row(kind: str, channels: int, size: int, batch: int, fraction: float, reps: int, warmup: int,
                seed: int = 0) -> dict:
    """Median ms of the dense block (NCHW and channels_last) and the sparse block for one configuration."""
    gen = torch.Generator().manual_seed(seed)
    dense, gated = _blocks(kind, channels, gen)
    mask = coherent_mask(batch, size, size, fraction, seed + 1)
    x = _steer_gate(gated, torch.randn(batch, channels, size, size, generator=gen), mask)
    sparse_cls = SparseInvertedResidual if kind == "ir" else SparseBasicBlock
    sparse = sparse_cls.from_gated(gated)
    reference = copy.deepcopy(sparse)
    reference.use_native = False
    fused = folded_dense(dense)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        expected = gated(x)
        got = sparse(x_cl)
        if not torch.equal(sparse.last_mask, mask):
            raise RuntimeError("the steered mask unit did not produce the benchmark mask")
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0))
        path = sparse.last_path

    def infer(module: nn.Module, inp: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode():
                module(inp)

        return step

    steps = {"dense_nchw": infer(fused, x), "dense_cl": infer(fused, x_cl), "sparse": infer(sparse, x_cl),
             "sparse_pytorch": infer(reference, x_cl)}
    t = median_ms(steps, reps, warmup)
    dense_layout = "nchw" if t["dense_nchw"] <= t["dense_cl"] else "cl"
    dense_ms = min(t["dense_nchw"], t["dense_cl"])
    speedup = dense_ms / t["sparse"]
    ideal = float("inf") if fraction == 0 else 1.0 / fraction
    row = {
        "block": "mbv2-ir" if kind == "ir" else "resnet-basic", "kind": kind, "channels": channels,
        "size": size, "batch": batch, "fraction": fraction,
        "dilated_fraction": float(torch.nn.functional.max_pool2d(mask, 3, 1, 1).mean()),
        "dense_nchw_ms": t["dense_nchw"], "dense_cl_ms": t["dense_cl"], "dense_ms": dense_ms,
        "dense_layout": dense_layout, "sparse_ms": t["sparse"], "sparse_path": path, "speedup": speedup, "ideal": ideal,
        "realized_over_ideal": speedup / ideal, "sparse_pytorch_ms": t["sparse_pytorch"],
        "speedup_pytorch": dense_ms / t["sparse_pytorch"],
    }
    row.update(verdict(row))
    return row


def verdict(row: dict) -> dict:
    """``target`` (minimum speedup, or None) and ``passed`` (bool, or None without a target) for a row."""
    target = TARGETS.get((row["kind"], row["batch"], row["fraction"]))
    if row["fraction"] == 1.0 and row["kind"] == "ir":
        target = 1.0 / FULL_SLOWDOWN
    if target is None:
        return {"target": None, "passed": None}
    return {"target": target, "passed": bool(row["speedup"] >= target)}


def measure(reps: int = 30, warmup: int = 3, batches: tuple[int, ...] = BATCHES,
            fractions: tuple[float, ...] = FRACTIONS, blocks: tuple = BLOCKS,
            on_row: Callable[[dict], None] | None = None, kinds: tuple[str, ...] = ("ir", "basic")) -> list[dict]:
    """All rows as dicts (times in ms); ``on_row`` is called with each row as soon as it is measured."""
    rows = []
    for _, kind, channels, size in blocks:
        if kind not in kinds:
            continue
        for batch in batches:
            for fraction in fractions:
                row = measure_row(kind, channels, size, batch, fraction, reps, warmup)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


HEADER = (f"{'block':<13}{'input':>14}{'active':>8}{'dilated':>8}{'dense ms':>10}{'layout':>7}{'sparse ms':>11}"
          f"{'path':>9}{'speedup':>9}{'ideal':>7}{'real/ideal':>11}{'target':>8}{'verdict':>9}"
          f"{'pytorch ms':>12}{'speedup':>9}")


def format_row(row: dict) -> str:
    shape = f"{row['batch']}x{row['channels']}x{row['size']}x{row['size']}"
    target = "-" if row["target"] is None else f">={row['target']:.2f}"
    verdict_text = "-" if row["passed"] is None else ("pass" if row["passed"] else "FAIL")
    return (f"{row['block']:<13}{shape:>14}{row['fraction']:>8.2f}{row['dilated_fraction']:>8.2f}"
            f"{row['dense_ms']:>10.3f}{row['dense_layout']:>7}{row['sparse_ms']:>11.3f}{row['sparse_path']:>9}"
            f"{row['speedup']:>9.2f}"
            f"{row['ideal']:>7.1f}{row['realized_over_ideal']:>11.2f}{target:>8}{verdict_text:>9}"
            f"{row['sparse_pytorch_ms']:>12.3f}{row['speedup_pytorch']:>9.2f}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    timing_args(parser, min_reps=10, default_reps=30)
    parser.add_argument("--batch", type=int, action="append", help="batch size(s) to run (default: 1 and 32)")
    parser.add_argument("--block", choices=("ir", "basic"), action="append",
                        help="block kind(s) to run: ir (MobileNetV2) or basic (ResNet); default both")
    parser.add_argument("--keep-malloc", action="store_true",
                        help="keep glibc's default allocator settings (default: rerun with MALLOC_ENV)")
    args = parser.parse_args(argv)
    apply_timing_args(parser, args, min_reps=10)
    batches = tuple(args.batch) if args.batch else BATCHES
    if any(b < 1 for b in batches):
        parser.error("--batch must be >= 1")

    cpu = platform.processor() or platform.machine()
    malloc = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "default malloc"
    print(f"torch {torch.__version__}, CPU {cpu}, {torch.get_num_threads()} thread(s), median of {args.reps} "
          f"after {args.warmup} warm-up, {malloc}; dense = best of NCHW / channels_last with BN folded; "
          f"sparse includes its mask unit (pytorch: the same block in its PyTorch reference); masks: one coherent "
          f"blob per image")
    print(HEADER)
    print("-" * len(HEADER))
    kinds = tuple(args.block) if args.block else ("ir", "basic")
    rows = measure(args.reps, args.warmup, batches, on_row=lambda row: print(format_row(row), flush=True),
                   kinds=kinds)
    judged = [r for r in rows if r["passed"] is not None]
    failed = [r for r in judged if not r["passed"]]
    print(f"targets: {len(judged) - len(failed)} of {len(judged)} met")
    return rows


def _rerun_with_stable_malloc() -> None:
    """Re-execute this command with ``MALLOC_ENV`` unless it is set, ``--keep-malloc`` is given or the C library
    is not glibc."""
    if "--keep-malloc" in sys.argv or platform.libc_ver()[0] != "glibc":
        return
    if all(os.environ.get(key) == value for key, value in MALLOC_ENV.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **MALLOC_ENV})


if __name__ == "__main__":
    _rerun_with_stable_malloc()
    main()
