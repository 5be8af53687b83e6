"""The builder operators describe themselves to for the compiled whole-model plan (``csrc/model_plan.h``).

The plan is a list of ops on preallocated buffers (stacks of zero-padded
planes, or rows for DynConv's sparse blocks) run in one call per batch. A
model joins it through a small protocol beside ``counted_macs`` and
``fold_batchnorm``:

- a model: ``plan_into(builder)``, adding its stem, blocks and head;
- a block: ``plan_into(builder, name, x) -> buffer``;
- a conv: ``plan_into(builder, name, x, res=-1, act=ACT_NONE) -> buffer``, the
  conv of buffer ``x`` [+ residual buffer ``res``] through activation ``act``.

A plain ``nn.Conv2d`` (ungrouped of any square size, or depthwise 3x3) and
``nn.MaxPool2d`` need no hook: the builder knows them. Modules of other
libraries, which cannot carry a hook, describe themselves through planners
registered for their type (:func:`planner`; torchvision's ResNets and
MobileNetV2 in :mod:`pipeline.ops.plan.torchvision`). Anything else without
``plan_into`` stops the build with :class:`Unsupported` naming the layer, and
the model runs as PyTorch modules.
The builder's primitives (static, mixed and depthwise convs, rows convs, the
mask unit, the head) check every shape in C++ too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from pipeline.ops import native

# Activations where an op stores its output (plan::kAct* in csrc/plan_kernels.h).
ACT_NONE, ACT_RELU, ACT_RELU6 = 0, 1, 2
# Roles of a routing head's outputs (ModelPlan::k*Head): the kernel attention (DyNet's coefficients) and
# ODConv's spatial, input-channel and filter attentions.
KERNEL, SPATIAL, CHANNEL, FILTER = 0, 1, 2, 3
# Activation codes of a head (pipeline.ops.dynamic_conv.ACTIVATIONS order).
LINEAR, SIGMOID, SOFTMAX = 0, 1, 2


class Unsupported(ValueError):
    """The model has a part the compiled plan does not implement (it then runs as PyTorch modules)."""


_PLANNERS: dict[type, Callable] = {}


def planner(*types: type) -> Callable[[Callable], Callable]:
    """Register a function as the ``plan_into`` of modules of exactly these types (modules of other libraries):
    ``f(module, builder)`` for a model, ``f(module, builder, name, x) -> buffer`` for a block."""

    def register(f: Callable) -> Callable:
        for t in types:
            _PLANNERS[t] = f
        return f

    return register


def plan_hook(module: nn.Module) -> Callable | None:
    """The module's ``plan_into``, or the planner registered for its type, bound to it; None if neither."""
    hook = getattr(module, "plan_into", None)
    if hook is not None:
        return hook
    if type(module).__module__.startswith("torchvision."):  # its planners: registered on first use
        from pipeline.ops.plan import torchvision  # noqa: F401

    f = _PLANNERS.get(type(module))
    return None if f is None else (lambda *args, **kwargs: f(module, *args, **kwargs))


class Head(NamedTuple):
    """One head of a routing: its role, number of outputs, activation code and 1 / temperature."""

    role: int
    size: int
    activation: int
    inv_temperature: float = 1.0


class Routing(NamedTuple):
    """Per-sample attentions ``act_h(fc2_h(relu(fc1(GAP(x)))))`` of a dynamic conv; ``fc2`` stacks the heads'
    rows in the order of ``heads``."""

    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    heads: Sequence[Head]


def _f(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def conv_geometry(name: str, kernel_size, stride, padding, dilation=(1, 1), padding_mode: str = "zeros"
                  ) -> tuple[int, int]:  # fmt: skip
    """(kernel size, stride) of a conv the plan runs: 3x3 padding 1 or 1x1 padding 0, stride 1 or 2,
    undilated, zero-padded; raises :class:`Unsupported` naming ``name`` otherwise."""
    ks, st, pad = tuple(kernel_size), tuple(stride), tuple(padding)
    if padding_mode != "zeros" or tuple(dilation) != (1, 1):
        raise Unsupported(f"{name}: only undilated, zero-padded convs are compiled")
    if (ks, pad) not in (((3, 3), (1, 1)), ((1, 1), (0, 0))) or st not in ((1, 1), (2, 2)):
        raise Unsupported(f"{name}: kernel {ks}, stride {st}, padding {pad} is not compiled "
                          "(3x3 padding 1 or 1x1 padding 0, stride 1 or 2)")  # fmt: skip
    return ks[0], st[0]


def _window_geometry(conv: nn.Conv2d) -> tuple[int, int] | None:
    """(stride, padding) of a plain conv the plane kernels do not run directly but the window gather does: a
    square, undilated, zero-padded kernel other than 3x3 padding 1 / 1x1 padding 0 at stride 1 or 2; None for
    those (and for what neither runs)."""
    ks, st, pad = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)
    if conv.padding_mode != "zeros" or tuple(conv.dilation) != (1, 1) or isinstance(conv.padding, str):
        return None
    if len(set(ks)) != 1 or len(set(st)) != 1 or len(set(pad)) != 1 or pad[0] >= ks[0]:
        return None
    if (ks, pad) in (((3, 3), (1, 1)), ((1, 1), (0, 0))) and st in ((1, 1), (2, 2)):
        return None
    return st[0], pad[0]


class PlanBuilder:
    """Adds ops to one ``ModelPlan`` for inputs [B, *shape] and remembers the tensors they were built from
    (the plan is rebuilt when one of them changes)."""

    # What the operators and models outside this package use, so that describing themselves imports nothing.
    ACT_NONE, ACT_RELU, ACT_RELU6 = ACT_NONE, ACT_RELU, ACT_RELU6
    Unsupported = Unsupported

    def __init__(self, shape: tuple[int, int, int]):
        module = native.load()
        if module is None:
            raise Unsupported("the native CPU kernels are unavailable")
        self.plan = module.ModelPlan(*shape)
        self.shapes = {0: tuple(shape)}
        self.sources: list[torch.Tensor] = []
        self.taps: dict[int, int] = {}  # input buffer -> its gathered stride-2 taps
        self.rows: set[int] = set()  # rows buffers (DynConv's sparse blocks); the others are planes
        self.copies: dict[int, int] = {}  # buffer -> its copy in the other layout
        self.gate_maps: list[tuple[int, int]] = []  # per rows gate: its mask and dilated mask buffers
        self.labels: list[str] = []  # per op, in op order: what it computes (the plan's profile() names)

    def _label(self, what: str, out: int, x: int | None = None) -> None:
        """Name the op just added: what it computes, its input and output shapes."""
        shape = "x".join(map(str, self.shapes[out]))
        self.labels.append(f"{what} ({'x'.join(map(str, self.shapes[x])) + ' -> ' if x is not None else ''}{shape})")

    # ------------------------------------------------------------------ buffers
    def buffer(self, c: int, h: int, w: int, rows: bool = False) -> int:
        i = self.plan.rows_buffer(c, h, w) if rows else self.plan.buffer(c, h, w)
        self.shapes[i] = (c, h, w)
        if rows:
            self.rows.add(i)
        return i

    def watch(self, *tensors: torch.Tensor | None) -> None:
        """Rebuild the plan when one of ``tensors`` changes."""
        self.sources += [t for t in tensors if t is not None]

    def planes(self, x: int) -> int:
        """``x`` as planes (copied from its rows, once, unless it is planes)."""
        if x < 0 or x not in self.rows:
            return x
        if x not in self.copies:
            self.copies[x] = self.buffer(*self.shapes[x])
            self.plan.to_planes(x, self.copies[x])
            self._label("to_planes", x)
        return self.copies[x]

    def _reads(self, src: int, ks: int, stride: int) -> tuple[int, int, int, int]:
        """(buffer, conv mode, output height, width) of a ``ks`` x ``ks`` conv with ``stride`` on ``src``:
        the buffer itself, or for stride 2 its gathered taps (gathered once per buffer)."""
        c, h, w = self.shapes[src]
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        if stride == 1:
            return src, (0 if ks == 3 else 1), ho, wo
        if src not in self.taps:
            self.taps[src] = self.buffer(9 * c, ho, wo)
            self.plan.gather(src, self.taps[src])
            self._label("gather stride-2 taps", src)
        return self.taps[src], (2 if ks == 3 else 3), ho, wo

    # ------------------------------------------------------------------ modules
    def conv(self, name: str, conv: nn.Module, x: int, res: int = -1, act: int = ACT_NONE) -> int:
        """``act(conv(x) [+ res])``: a plain ``nn.Conv2d`` here, any other conv through its ``plan_into``."""
        if type(conv) is nn.Conv2d:
            window = _window_geometry(conv) if conv.groups == 1 else None
            if window is not None:
                self.watch(conv.weight, conv.bias)
                return self.window_conv(name, x, conv.weight, conv.bias, *window, res, act)
            ks, stride = conv_geometry(name, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                       conv.padding_mode)  # fmt: skip
            self.watch(conv.weight, conv.bias)
            if conv.groups == 1:
                return self.static_conv(name, x, conv.weight, conv.bias, stride, res, act)
            if conv.groups == conv.in_channels == conv.out_channels and ks == 3:
                return self.depthwise(name, x, conv.weight.unsqueeze(0), conv.bias, None, stride, res, act)
            raise Unsupported(f"{name}: a grouped conv other than depthwise 3x3 is not compiled")
        hook = getattr(conv, "plan_into", None)
        if hook is None:
            raise Unsupported(f"{name}: {type(conv).__name__} has no compiled plan")
        return hook(self, name, x, res=res, act=act)

    def block(self, name: str, block: nn.Module, x: int) -> int:
        """A block through its ``plan_into`` (or its type's registered planner)."""
        hook = plan_hook(block)
        if hook is None:
            raise Unsupported(f"{name}: {type(block).__name__} has no compiled plan")
        return hook(self, name, x)

    @staticmethod
    def folded(name: str, *modules: nn.Module) -> None:
        """Check that each BatchNorm slot was folded into its conv (it is then ``nn.Identity``)."""
        for m in modules:
            if type(m) is not nn.Identity:
                raise Unsupported(f"{name}: a BatchNorm is not folded ({type(m).__name__})")

    # ------------------------------------------------------------------ plane ops
    def static_conv(self, name: str, x: int, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                    res: int = -1, act: int = ACT_NONE) -> int:
        """``act(conv(x) + bias [+ res])`` for an input-independent kernel [C_out, C_in, k, k]."""
        x, res = self.planes(x), self.planes(res)
        read, mode, ho, wo = self._reads(x, weight.shape[-1], stride)
        out = self.buffer(weight.shape[0], ho, wo)
        self.plan.fixed_conv(read, out, res, act, mode, _f(weight), _f(bias))
        self._label(f"{name} static {weight.shape[-1]}x{weight.shape[-1]}", out, x)
        return out

    def window_conv(self, name: str, x: int, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                    pad: int, res: int = -1, act: int = ACT_NONE) -> int:
        """A static conv of another size than 3x3 / 1x1 (the 7x7, stride-2 stem of ImageNet ResNets): its k x k
        taps gathered into planes (tap, c_in), then a 1x1 conv with the kernel's (ky, kx, c_in) columns."""
        x, res = self.planes(x), self.planes(res)
        c = self.shapes[x][0]
        k = weight.shape[-1]
        ho, wo = self._window_output(name, x, k, stride, pad)
        taps = self.buffer(k * k * c, ho, wo)
        self.plan.gather_window(x, taps, k, stride, pad)
        self._label(f"{name} gather {k}x{k} taps", taps, x)
        matrix = weight.detach().permute(0, 2, 3, 1).reshape(weight.shape[0], -1, 1, 1)
        out = self.buffer(weight.shape[0], ho, wo)
        self.plan.fixed_conv(taps, out, res, act, 1, _f(matrix), _f(bias))
        self._label(f"{name} static {k}x{k} (1x1 on its taps)", out, x)
        return out

    def _window_output(self, name: str, x: int, k: int, stride: int, pad: int) -> tuple[int, int]:
        """Output size of k x k windows at ``stride`` with padding ``pad`` on buffer ``x``."""
        _, h, w = self.shapes[x]
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        if ho < 1 or wo < 1:
            raise Unsupported(f"{name}: a {k}x{k} window does not fit a {h}x{w} map")
        return ho, wo

    def max_pool(self, name: str, pool: nn.Module, x: int) -> int:
        """``nn.MaxPool2d`` (square window, no dilation, floor mode)."""
        if type(pool) is not nn.MaxPool2d:
            raise Unsupported(f"{name}: {type(pool).__name__} is not a max pooling the plan runs")
        k, stride, pad, dilation = (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        if any(not isinstance(v, int) for v in (k, stride, pad, dilation)) or dilation != 1 or pool.ceil_mode:
            raise Unsupported(f"{name}: only square, undilated, floor-mode max pooling is compiled")
        x = self.planes(x)
        out = self.buffer(self.shapes[x][0], *self._window_output(name, x, k, stride, pad))
        self.plan.max_pool(x, out, k, stride, pad)
        self._label(f"{name} max pool {k}x{k}", out, x)
        return out

    def mixture(self, name: str, x: int, kernels: torch.Tensor, bias: torch.Tensor | None, routing: Routing,
                stride: int, res: int = -1, act: int = ACT_NONE) -> int:
        """A dynamic conv: the kernels [K, C_out, C_in, k, k] mixed per sample by the routing's kernel head and
        scaled by its other heads; ``bias`` [K, C_out] (mixed) or [C_out] (added as it is)."""
        x, res = self.planes(x), self.planes(res)
        read, mode, ho, wo = self._reads(x, kernels.shape[-1], stride)
        out = self.buffer(kernels.shape[1], ho, wo)
        self.plan.dynamic_conv(read, x, out, res, act, mode, _f(kernels), _f(bias), *self._routing(routing))
        self._label(f"{name} dynamic {kernels.shape[-1]}x{kernels.shape[-1]}", out, x)
        return out

    def depthwise(self, name: str, x: int, kernels: torch.Tensor, bias: torch.Tensor | None,
                  routing: Routing | None, stride: int, res: int = -1, act: int = ACT_NONE) -> int:
        """A depthwise 3x3 conv (padding 1): kernels [K, C, 1, 3, 3] (K = 1 without a routing)."""
        x, res = self.planes(x), self.planes(res)
        _, h, w = self.shapes[x]
        out = self.buffer(kernels.shape[1], (h - 1) // stride + 1, (w - 1) // stride + 1)
        fc = self._routing(routing) if routing is not None else (None, None, None, None, [])
        self.plan.depthwise_conv(x, x if routing is not None else -1, out, res, act, stride, _f(kernels),
                                 _f(bias), *fc)  # fmt: skip
        self._label(f"{name} depthwise", out, x)
        return out

    @staticmethod
    def _routing(r: Routing) -> tuple:
        heads = [(int(h.role), int(h.size), int(h.activation), float(h.inv_temperature)) for h in r.heads]
        return _f(r.fc1_weight), _f(r.fc1_bias), _f(r.fc2_weight), _f(r.fc2_bias), heads

    def outputs(self, *buffers: int) -> None:
        """The maps the plan returns (``forward_maps``) instead of a head's logits: a block planned alone."""
        self.plan.outputs(list(buffers))

    def head(self, name: str, x: int, pool: nn.Module, fc: nn.Module) -> None:
        """Global average pooling and a linear classifier: the plan's output."""
        if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
            raise Unsupported(f"{name}: only global average pooling is compiled")
        if type(fc) is not nn.Linear:
            raise Unsupported(f"{name}: only a linear head is compiled")
        bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)
        self.plan.head(x, _f(fc.weight), _f(bias))
        self.watch(fc.weight, fc.bias)

    # ------------------------------------------------------------------ rows ops (DynConv's sparse blocks)
    def as_rows(self, x: int) -> int:
        """``x`` as a rows buffer (copied from its planes unless it is one)."""
        if x < 0 or x in self.rows:
            return x
        if x not in self.copies:
            self.copies[x] = self.buffer(*self.shapes[x], rows=True)
            self.plan.to_rows(x, self.copies[x])
            self._label("to_rows", x)
        return self.copies[x]

    def rows_conv(self, x: int, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, act: int = ACT_NONE,
                  res: int = -1, gate: int = -1, which: int = 0) -> int:
        """``act(conv(x) + bias [+ res])`` on rows (3x3 padding 1 or 1x1), at every position, or with ``gate``
        at its dilated mask (``which`` 0), at its mask with ``act(res)`` elsewhere (``which`` 1), or at its
        expanded mask on the gate's input grid (``which`` 2)."""
        x, res = self.as_rows(x), self.as_rows(res)
        _, h, w = self.shapes[x]
        out = self.buffer(weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1, rows=True)
        self.plan.rows_conv(x, out, res, act, stride, _f(weight), _f(bias), gate, which)
        where = "" if gate < 0 else (" at dilated mask", " at mask", " at expanded mask")[which]
        self._label(f"rows {weight.shape[-1]}x{weight.shape[-1]}{where}", out, x)
        return out

    def rows_depthwise(self, x: int, weight: torch.Tensor, bias: torch.Tensor, act: int = ACT_NONE, gate: int = -1,
                       which: int = 0) -> int:
        """``act(depthwise3x3(x) + bias)`` on rows (stride 1, padding 1) at every position or, with ``gate``, at
        its dilated mask (``which`` 0) or its mask (``which`` 1)."""
        x = self.as_rows(x)
        out = self.buffer(*self.shapes[x], rows=True)
        self.plan.rows_depthwise(x, out, act, _f(weight), _f(bias), gate, which)
        self._label("rows depthwise" + ("" if gate < 0 else " at mask" if which else " at dilated mask"), out, x)
        return out

    def rows_gate(self, x: int, stride: int, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                  fc_weight: torch.Tensor, fc_bias: torch.Tensor, expand: bool = False) -> int:
        """DynConv's mask unit on rows ``x``: mask ``logits >= 0`` at stride ``stride``, its 3x3 dilation and
        the position lists the gated convs run over (with ``expand``, also the input positions a 3x3 conv with
        ``stride`` reads for the mask: ``rows_conv(..., which=2)``); returns the gate's index. ``gate_maps``
        records its mask and the map its first conv runs at (the expanded one with ``expand``)."""
        x = self.as_rows(x)
        _, h, w = self.shapes[x]
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        mask, dilated = self.buffer(1, ho, wo), self.buffer(1, ho, wo)
        expanded = self.buffer(1, h, w) if expand else -1
        self.gate_maps.append((mask, expanded if expand else dilated))
        gate = self.plan.rows_gate(x, mask, dilated, expanded, stride, _f(conv_weight), _f(conv_bias),
                                   _f(fc_weight), _f(fc_bias))  # fmt: skip
        self._label("rows mask unit", mask, x)
        return gate

    def conv_on_rows(self, name: str, conv: nn.Module, x: int, act: int = ACT_NONE) -> int:
        """A plain conv at every position of rows (the stem before a sparse block: copying its input to rows
        costs less than copying its output)."""
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            return self.as_rows(self.conv(name, conv, x, act=act))
        _, stride = conv_geometry(name, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
        self.watch(conv.weight, conv.bias)
        return self.rows_conv(x, conv.weight, conv.bias, stride, act)


    def sequence(self, name: str, blocks: Iterable[tuple[str, nn.Module]], x: int) -> int:
        """The named blocks in order, each through :meth:`block`."""
        for sub, block in blocks:
            x = self.block(f"{name}.{sub}" if name else sub, block, x)
        return x
