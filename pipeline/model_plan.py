"""Whole-model compiled inference (``csrc/model_plan.cpp``): one call per batch, no Python between layers.

At batch 1 a CIFAR ResNet at DyNet's width runs about 7 M MACs; PyTorch's
per-operator dispatch and the per-layer plans' Python round trips then cost
more than the arithmetic, and a runtime that fuses the dense model (ONNX
Runtime, OpenVINO) wins even with 4 x the MACs. :func:`compile_model` maps a
BN-folded ``CifarResNet`` whose convs are plain ``nn.Conv2d`` or dynamic
kernel mixtures (``DynamicConv2d``: DyNet / CondConv / DY-Conv; ``SDConv2d``,
whose pruned weights it skips), and whose blocks may be DynConv's sparse
blocks (``SparseBasicBlock``: the gated convs run only at the active positions
of the mask or its dilation), onto the compiled plan; :class:`PlannedModel`
runs it. The model's own forward stays the reference: tests compare the two
on random inputs, and the plan is rebuilt when a parameter changes.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.cifar_resnet import BasicBlock, CifarResNet
from pipeline.ops import native
from pipeline.ops.dynamic_conv import ACTIVATIONS, DynamicConv2d
from pipeline.ops.sparse_exec import SparseBasicBlock
from pipeline.ops.spatial_gate import MaskUnit


class Unsupported(ValueError):
    """The model has a part the compiled plan does not implement (it then runs as a PyTorch module)."""


def _is_mixture(conv: nn.Module) -> bool:
    """A dynamic conv computing conv(x, sum_k a_k W_k) with ``W = conv.kernels()``: ``DynamicConv2d`` and
    subclasses that change only its kernels (SD-Conv's masked ones), not its forward."""
    cls = type(conv)
    return (isinstance(conv, DynamicConv2d) and cls.forward is DynamicConv2d.forward
            and cls._forward_inference is DynamicConv2d._forward_inference)  # fmt: skip


def _check_geometry(name: str, conv: nn.Module) -> tuple[int, int]:
    """(kernel size, stride) of a conv the plan runs: 3x3 padding 1 or 1x1 padding 0, stride 1 or 2,
    ungrouped, undilated."""
    ks, stride, padding = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)
    if getattr(conv, "padding_mode", "zeros") != "zeros" or conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        raise Unsupported(f"{name}: only ungrouped, undilated, zero-padded convs are compiled")
    if (ks, padding) not in (((3, 3), (1, 1)), ((1, 1), (0, 0))) or stride not in ((1, 1), (2, 2)):
        raise Unsupported(f"{name}: kernel {ks}, stride {stride}, padding {padding} is not compiled "
                          "(3x3 padding 1 or 1x1 padding 0, stride 1 or 2)")  # fmt: skip
    return ks[0], stride[0]


class _Builder:
    def __init__(self, shape: tuple[int, int, int]):
        module = native.load()
        if module is None:
            raise Unsupported("the native CPU kernels are unavailable")
        self.plan = module.ModelPlan(*shape)
        self.shapes = {0: shape}
        self.sources: list[torch.Tensor] = []
        self.taps: dict[int, int] = {}  # input buffer -> its gathered stride-2 taps
        self.rows: set[int] = set()  # buffers of rows (DynConv's sparse blocks), the others of planes

    def buffer(self, c: int, h: int, w: int, rows: bool = False) -> int:
        i = self.plan.rows_buffer(c, h, w) if rows else self.plan.buffer(c, h, w)
        self.shapes[i] = (c, h, w)
        if rows:
            self.rows.add(i)
        return i

    def reads(self, src: int, ks: int, stride: int) -> tuple[int, int, int, int]:
        """(buffer, conv mode, output height, width) of a ``ks`` x ``ks`` conv with ``stride`` on ``src``:
        the buffer itself, or for stride 2 its gathered taps (gathered once per buffer)."""
        c, h, w = self.shapes[src]
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        if stride == 1:
            return src, (0 if ks == 3 else 1), ho, wo
        if src not in self.taps:
            self.taps[src] = self.buffer(9 * c, ho, wo)
            self.plan.gather(src, self.taps[src])
        return self.taps[src], (2 if ks == 3 else 3), ho, wo

    def fixed(self, src: int, stride: int, weight: torch.Tensor, bias: torch.Tensor | None, res: int = -1,
               relu: bool = False) -> tuple[int, int]:
        """Add ``[relu](conv(src) + bias [+ res])`` for a kernel that does not depend on the input; returns
        (op, output buffer)."""
        read, mode, ho, wo = self.reads(src, weight.shape[-1], stride)
        out = self.buffer(weight.shape[0], ho, wo)
        self.sources += [weight] + ([bias] if bias is not None else [])
        with torch.no_grad():
            op = self.plan.fixed_conv(read, out, res, relu, mode, weight.detach().float(),
                                       None if bias is None else bias.detach().float())  # fmt: skip
        return op, out

    def conv(self, name: str, conv: nn.Module, src: int, res: int = -1, relu: bool = False) -> int:
        """Add ``[relu](conv(src) [+ res])``; returns the output buffer."""
        if not (type(conv) is nn.Conv2d or _is_mixture(conv)):
            raise Unsupported(f"{name}: {type(conv).__name__} has no compiled plan")
        ks, stride = _check_geometry(name, conv)
        if type(conv) is nn.Conv2d:
            return self.fixed(src, stride, conv.weight, conv.bias, res, relu)[1]
        read, mode, ho, wo = self.reads(src, ks, stride)
        out = self.buffer(conv.out_channels, ho, wo)
        fc1, fc2 = conv._fc
        self.sources += [t for t in conv._native_sources() if t is not None]
        with torch.no_grad():
            self.plan.dynamic_conv(
                read, src, out, res, relu, mode, conv.kernels().detach().float(),
                None if conv.bias is None else conv.bias.detach().float(),
                fc1.weight.detach().float(), fc1.bias.detach().float(), fc2.weight.detach().float(),
                fc2.bias.detach().float(), ACTIVATIONS.index(conv.activation), conv.temperature)
        return out

    def as_rows(self, x: int) -> int:
        """``x`` as a rows buffer (copied from its planes unless it is one)."""
        if x in self.rows:
            return x
        out = self.buffer(*self.shapes[x], rows=True)
        self.plan.to_rows(x, out)
        return out

    def rows_conv(self, name: str, conv: nn.Module, src: int, relu: bool) -> int:
        """``[relu](conv(src))`` at every position of rows buffers, for a conv with a fixed kernel; returns the
        output buffer."""
        if type(conv) is not nn.Conv2d:
            raise Unsupported(f"{name}: {type(conv).__name__} has no compiled plan on rows")
        _, stride = _check_geometry(name, conv)
        src = self.as_rows(src)
        _, h, w = self.shapes[src]
        out = self.buffer(conv.out_channels, (h - 1) // stride + 1, (w - 1) // stride + 1, rows=True)
        self.sources += [conv.weight] + ([conv.bias] if conv.bias is not None else [])
        with torch.no_grad():
            self.plan.rows_conv(src, out, -1, relu, stride, conv.weight.detach().float(),
                                None if conv.bias is None else conv.bias.detach().float(), -1, 0)  # fmt: skip
        return out

    def sparse_block(self, name: str, block: SparseBasicBlock, x: int) -> int:
        """DynConv's sparse block on rows buffers (position-major): mask unit, shortcut at every position,
        conv1 at the dilated mask's positions, conv2 at the mask's (added to the shortcut, which passes alone
        elsewhere), ReLU after the sum; returns the output buffer."""
        gate = block.gate
        if type(gate) is not MaskUnit or gate.training or gate.stride != block.stride or block.stride not in (1, 2):
            raise Unsupported(f"{name}.gate: only an eval-mode mask unit with the block's stride (1 or 2) is compiled")
        c, h, w = self.shapes[x]
        x = self.as_rows(x)
        s = block.stride
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
        mask, dilated = self.buffer(1, ho, wo), self.buffer(1, ho, wo)
        self.sources += [gate.conv.weight, gate.conv.bias, gate.fc.weight, gate.fc.bias]
        p = block._buffers
        self.sources += [t for t in p.values() if t is not None]
        out_c = p["w1"].shape[0]
        with torch.no_grad():
            g = self.plan.rows_gate(x, mask, dilated, s, gate.conv.weight.detach().float(),
                                    gate.conv.bias.detach().float(), gate.fc.weight.detach().float(),
                                    gate.fc.bias.detach().float())  # fmt: skip
            res = x
            if p["ws"] is not None:
                res = self.buffer(out_c, ho, wo, rows=True)
                self.plan.rows_conv(x, res, -1, False, s, p["ws"].float(), p["bs"].float(), -1, 0)
            t = self.buffer(out_c, ho, wo, rows=True)
            self.plan.rows_conv(x, t, -1, True, s, p["w1"].float(), p["b1"].float(), g, 0)
            out = self.buffer(out_c, ho, wo, rows=True)
            self.plan.rows_conv(t, out, res, True, 1, p["w2"].float(), p["b2"].float(), g, 1)
        return out


def _identity(module: nn.Module) -> bool:
    return type(module) is nn.Identity


def compile_model(model: nn.Module, shape: tuple[int, int, int]) -> tuple[object, list[torch.Tensor]]:
    """The compiled plan of an eval-mode, BN-folded ``CifarResNet`` for inputs [B, *shape], and the tensors it
    was built from. Raises :class:`Unsupported` naming the first part it cannot run."""
    if type(model) is not CifarResNet:
        raise Unsupported(f"{type(model).__name__}: only the CIFAR ResNet is compiled")
    if model.training:
        raise Unsupported("the model is in training mode")
    if not _identity(model.bn):
        raise Unsupported("bn: the stem's BatchNorm is not folded")
    b = _Builder(shape)
    if len(model.layer1) and type(model.layer1[0]) is SparseBasicBlock and type(model.stem) is nn.Conv2d:
        x = b.rows_conv("stem", model.stem, 0, relu=True)  # copying the input to rows costs less than its output
    else:
        x = b.conv("stem", model.stem, 0, relu=True)
    for s in (1, 2, 3):
        for i, block in enumerate(getattr(model, f"layer{s}")):
            name = f"layer{s}.{i}"
            if type(block) is SparseBasicBlock:
                x = b.sparse_block(name, block, x)
                continue
            if type(block) is not BasicBlock:
                raise Unsupported(f"{name}: {type(block).__name__} has no compiled plan")
            if x in b.rows:
                raise Unsupported(f"{name}: a dense block after a sparse one is not compiled")
            if not (_identity(block.bn1) and _identity(block.bn2)):
                raise Unsupported(f"{name}: a BatchNorm is not folded")
            if _identity(block.shortcut):
                res = x
            elif (type(block.shortcut) is nn.Sequential and len(block.shortcut) == 2
                  and _identity(block.shortcut[1])):  # fmt: skip
                res = b.conv(f"{name}.shortcut.0", block.shortcut[0], x)
            else:
                raise Unsupported(f"{name}.shortcut: only identity or a folded 1x1 conv is compiled")
            t = b.conv(f"{name}.conv1", block.conv1, x, relu=True)
            x = b.conv(f"{name}.conv2", block.conv2, t, res=res, relu=True)
    if type(model.pool) is not nn.AdaptiveAvgPool2d or model.pool.output_size not in (1, (1, 1)):
        raise Unsupported("pool: only global average pooling is compiled")
    if type(model.fc) is not nn.Linear:
        raise Unsupported("fc: only a linear head is compiled")
    with torch.no_grad():
        bias = model.fc.bias if model.fc.bias is not None else torch.zeros(model.fc.out_features)
        b.plan.head(x, model.fc.weight.detach().float(), bias.detach().float())
    b.sources += [model.fc.weight] + ([model.fc.bias] if model.fc.bias is not None else [])
    return b.plan, b.sources


class PlannedModel(nn.Module):
    """``model`` (eval mode, BatchNorm folded) whose no-grad float32 CPU forward runs the compiled plan.

    Same function as ``model``; gradients, other devices and dtypes go through ``model`` itself. The plan
    is built on the first call per input size and rebuilt when a parameter it was built from changed in
    place; a parameter replaced by another tensor object is not seen (wrap the model anew).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._plans: dict[tuple[int, ...], object] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_plans": {}}

    def plan_for(self, shape: tuple[int, ...]):
        """The compiled plan for inputs [B, *shape], built or rebuilt as needed; raises :class:`Unsupported`."""
        plan = self._plans.get(shape)
        if plan is not None and plan.current():
            return plan
        plan, sources = compile_model(self.model, shape)
        if plan.watch(sources):  # inference tensors (no version counter) cannot be watched: not cached
            self._plans[shape] = plan
        return plan

    def threads_per_image(self, shape: tuple[int, ...], threads: int, batch: int) -> int | None:
        """Threads that ran each image of a [batch, *shape] call on ``threads`` threads: 1 where each thread
        runs whole images (batch >= threads); below, what the plan chose on its first such call (the threads
        sharing every layer, or one thread alone: whichever it timed faster); None before that call."""
        if threads <= 1 or batch >= threads:
            return 1
        plan = self._plans.get(tuple(shape))
        return (plan.team(threads, batch) or None) if plan is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.model.training or not native.usable(x):
            return self.model(x)
        return self.plan_for(tuple(x.shape[1:])).forward(x)


def probe_shape(model: nn.Module) -> tuple[int, int, int]:
    """A small input shape with the model's input channels, to check that the plan compiles (plans for
    the real input size are built on the first call)."""
    return getattr(getattr(model, "stem", None), "in_channels", 1), 8, 8


def planned(model: nn.Module) -> nn.Module:
    """``PlannedModel(model)`` if the plan compiles for the model, else ``model`` unchanged."""
    wrapped = PlannedModel(model)
    try:
        wrapped.plan_for(probe_shape(model))
    except Unsupported:
        return model
    return wrapped
