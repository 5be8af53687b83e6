"""Dynamic convolution with per-sample kernels mixed from K static kernels.

One class covers three published variants that differ only in how the K
mixing coefficients are activated: DyNet (linear), CondConv (sigmoid) and
DY-Conv (softmax with a temperature).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.ops import native

ACTIVATIONS = ("linear", "sigmoid", "softmax")

IntPair = int | tuple[int, int]


def _pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _positive_int(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_float(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def conv_output_hw(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """Output height and width of a conv with these (pair) settings on an ``h`` x ``w`` input."""
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip((h, w), padding, dilation, kernel_size, stride)
    )


def check_input(x: torch.Tensor, channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"input must have shape [B, {channels}, H, W], got {list(x.shape)}")


class ConvShape:
    """Output size and input check of a conv module with ``in_channels``, ``kernel_size``, ``stride``,
    ``padding`` and ``dilation`` (pairs), shared by the dynamic convs."""

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        return conv_output_hw(h, w, self.kernel_size, self.stride, self.padding, self.dilation)

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(x, self.in_channels)


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """Constructor arguments of ``DynamicConv2d`` that reproduce ``conv``'s shape and sampling."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": only representable as symmetric explicit padding
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if any(t % 2 for t in totals):
                raise ValueError("conv.padding='same' needs an even dilation*(kernel_size-1) to be converted")
            padding = tuple(t // 2 for t in totals)
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": tuple(padding),
        "dilation": tuple(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }


class _DirectDynamicConv3x3(torch.autograd.Function):
    """The dynamic 3x3 conv (stride 1, padding 1) with given coefficients as the compiled training op.

    Forward: each sample convolved with its mixed kernel by the direct conv
    (``csrc/dynamic_conv.cpp``); backward (``csrc/dynamic_conv_grad.cpp``):
    grad x by the direct conv with the flipped, transposed mixed kernel, and
    each sample's weight gradient folded into grad a and grad bank on the
    thread that computed it, so the B per-sample kernels of the grouped-conv
    formulation never go through memory. Needs a batch of at least the
    thread count (one sample per thread at a time).
    """

    @staticmethod
    def forward(ctx, x, a, bank, bias):  # type: ignore[override]
        a = a.contiguous()
        ctx.save_for_backward(x, a, bank, bias)
        return native.load().dynamic_conv3x3(x, a, bank, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # type: ignore[override]
        x, a, bank, bias = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad]
        return tuple(native.load().dynamic_conv3x3_backward(gy, x, a, bank, bias, needs))


def direct_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Static 3x3 conv (stride 1, padding 1, no bias) through the compiled dynamic-conv op with one kernel and
    coefficient 1: differentiable, float32 CPU only. The static baseline of the dynamic conv's training
    benchmark that runs on the same kernels (``benchmarks/bench_dynamic_conv.py``)."""
    bank = weight.permute(2, 3, 1, 0).reshape(1, -1)
    return _DirectDynamicConv3x3.apply(x, x.new_ones(x.shape[0], 1), bank, None)


class DynamicConv2d(ConvShape, nn.Module):
    """Convolution whose kernel is a per-sample mixture of K static kernels.

    Implements W(x) = sum_k a_k(x) W_k and b(x) = sum_k a_k(x) b_k, followed by
    y = W(x) * x + b(x), as in DyNet (Zhang et al., "DyNet: Dynamic Convolution
    for Accelerating Convolutional Neural Networks", arXiv 2004.10694, 2020),
    CondConv (Yang et al., "CondConv: Conditionally Parameterized
    Convolutions for Efficient Inference", NeurIPS 2019, Eq. 2) and DY-Conv
    (Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
    CVPR 2020, Eq. 1). The coefficients come from global average pooling and
    a two-layer MLP, a(x) = act(MLP(GAP(x))), where ``act`` is the identity
    (DyNet), a sigmoid (CondConv) or softmax(z / T) (DY-Conv, Eq. 5).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = False,
        num_kernels: int = 4,
        activation: str = "softmax",
        temperature: float = 1.0,
        reduction: int = 4,
        min_hidden: int = 4,
    ):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.groups = _positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.num_kernels = _positive_int(num_kernels, "num_kernels")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.temperature = _positive_float(temperature, "temperature")
        self.reduction = _positive_int(reduction, "reduction")
        self.min_hidden = _positive_int(min_hidden, "min_hidden")
        self.hidden = max(self.min_hidden, in_channels // self.reduction)

        k, kh, kw = self.num_kernels, *self.kernel_size
        self.weight = nn.Parameter(torch.empty(k, out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(k, out_channels)) if bias else None
        self.routing = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, self.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.hidden, k),
        )
        self._inference_cache: dict[str, tuple] = {}
        # Float32 CPU inputs through the compiled kernels (same function; False: PyTorch ops only): the
        # inference plan, and for 3x3 / stride 1 / padding 1 ungrouped convs the training op.
        self.use_native = True
        self._direct = (self.kernel_size, self.stride, self.padding, self.dilation, self.groups) == (
            (3, 3), (1, 1), (1, 1), (1, 1), 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each static kernel (and bias) as ``nn.Conv2d`` would."""
        for w in self.weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0, 0].numel()
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def config(self) -> dict[str, Any]:
        """Constructor arguments, as plain Python values, that rebuild this module's shape."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "bias": self.bias is not None,
            "num_kernels": self.num_kernels,
            "activation": self.activation,
            "temperature": self.temperature,
            "reduction": self.reduction,
            "min_hidden": self.min_hidden,
        }

    def _cached(self, name: str, sources: tuple[torch.Tensor | None, ...], build: Callable[[], Any],
                settings: tuple = ()) -> Any:
        """``build()``, recomputed only when one of ``sources`` changed (in place or replaced, ``None`` included)
        or ``settings`` differ; for inference."""
        try:
            # A moved or re-typed tensor has new storage, so the pointer covers device and dtype; the id
            # catches a replaced tensor (the entry keeps the sources alive, so an id is not reused).
            key = [settings, *(None if t is None else (id(t), t._version, t.data_ptr()) for t in sources)]
        except RuntimeError:  # inference tensors have no version counter: nothing to key a cache on
            return build()
        entry = self._inference_cache.get(name)
        if entry is None or entry[0] != key:
            entry = self._inference_cache[name] = (key, build(), sources)
        return entry[1]

    def __getstate__(self) -> dict:
        # Derived tensors (possibly inference tensors, which cannot be copied) are rebuilt on demand.
        return {**super().__getstate__(), "_inference_cache": {}}

    @property
    def _fc(self) -> tuple[nn.Linear, nn.Linear]:
        # Attribute access to a submodule and indexing an nn.Sequential cost a microsecond or more each per
        # call; read the _modules dicts instead.
        modules = self._modules["routing"]._modules
        return modules["2"], modules["4"]  # type: ignore[return-value]

    def set_temperature(self, t: float) -> None:
        self.temperature = _positive_float(t, "temperature")

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Mixing coefficients a(x), shape [B, K]."""
        # Same math as self.routing(x), called layer by layer: at batch 1 the
        # module-call overhead of the Sequential is a visible share of the conv.
        # sum-then-scale rather than mean: mean's backward materialises a full
        # input-sized gradient, sum's is a broadcast view.
        fc1, fc2 = self._fc
        pooled = x.sum((2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))
        z = F.linear(F.relu(F.linear(pooled, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        if self.activation == "sigmoid":
            return torch.sigmoid(z)
        if self.activation == "softmax":
            return torch.softmax(z if self.temperature == 1.0 else z / self.temperature, dim=1)
        return z

    def kernels(self) -> torch.Tensor:
        """The K static kernels the mixture uses, shape [K, out, in/groups, kh, kw]."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not torch.is_grad_enabled():
            return self._forward_inference(x)
        b, c, h, w = x.shape
        a = self.coefficients(x)
        kernels = self.kernels()
        if self._direct and self.use_native and b >= torch.get_num_threads() and native.usable(x):
            # [K, (ky, kx, c_in, c_out)]: the compiled kernels' matrix layout; autograd maps its gradient back.
            bank = kernels.permute(0, 3, 4, 2, 1).reshape(self.num_kernels, -1)
            return _DirectDynamicConv3x3.apply(x, a, bank, self.bias)
        # One matmul mixes all samples' kernels; folding the batch into the
        # channel axis then turns B per-sample convs into one grouped conv.
        weight = (a @ kernels.reshape(self.num_kernels, -1)).reshape(b * self.out_channels, *kernels.shape[2:])
        bias = (a @ self.bias).reshape(-1) if self.bias is not None else None
        y = F.conv2d(
            x.reshape(1, b * c, h, w), weight, bias, self.stride, self.padding, self.dilation, b * self.groups
        )
        return y.view(b, self.out_channels, *y.shape[2:])

    def plan_into(self, b, name: str, x: int, res: int = -1, act: int = 0) -> int:
        """This conv in the compiled whole-model plan (``pipeline/ops/plan``): the kernels of :meth:`kernels`
        mixed per sample by the routing's coefficients (ungrouped, or depthwise 3x3)."""
        from pipeline.ops.plan.builder import KERNEL, Head, Routing, Unsupported, conv_geometry

        ks, stride = conv_geometry(name, self.kernel_size, self.stride, self.padding, self.dilation)
        fc1, fc2 = self._fc
        inv_t = 1.0 / self.temperature if self.activation == "softmax" else 1.0
        routing = Routing(fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                          [Head(KERNEL, self.num_kernels, ACTIVATIONS.index(self.activation), inv_t)])
        b.watch(*self._native_sources())
        if self.groups == 1:
            return b.mixture(name, x, self.kernels(), self.bias, routing, stride, res, act)
        if self.groups == self.in_channels == self.out_channels and ks == 3:
            return b.depthwise(name, x, self.kernels(), self.bias, routing, stride, res, act)
        raise Unsupported(f"{name}: a grouped dynamic conv other than depthwise 3x3 is not compiled")

    def _native_sources(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors the compiled inference plan is built from (it is rebuilt when one is replaced or changed)."""
        fc1, fc2 = self._fc
        p1, p2, own = fc1._parameters, fc2._parameters, self._parameters
        return p1["weight"], p1["bias"], p2["weight"], p2["bias"], own["weight"], own.get("bias")

    def _native_plan(self) -> Any:
        """The compiled plan of this module's current parameters (``pipeline/ops/native.py``), cached.

        Rebuilt when a source tensor is replaced (checked here by identity), changed in place or moved to
        new storage (checked by the plan itself, ``watch``), or the activation or temperature changes.
        """
        sources = self._native_sources()
        settings = (self.activation, self.temperature)
        entry = self._inference_cache.get("native")
        if entry is not None and entry[0] == settings and list(map(id, sources)) == entry[1] and entry[2].current():
            return entry[2]
        fc1, fc2 = self._fc
        with torch.no_grad():
            plan = native.load().DynamicConvPlan(
                fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.kernels(), self.bias,
                ACTIVATIONS.index(self.activation), self.temperature, list(self.stride), list(self.padding),
                list(self.dilation), self.groups)
        if plan.watch(list(sources)):  # the entry keeps the sources alive, so their ids are not reused
            self._inference_cache["native"] = (settings, list(map(id, sources)), plan, sources)
        return plan

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` without autograd: the same math in as few operator calls as possible.

        float32 CPU inputs run the compiled plan (``pipeline/ops/native.py``):
        pooling, routing MLP, activation and kernel mixing as plain loops and
        the conv (the per-sample direct 3x3 conv where it applies). Otherwise, at batch 1 the conv of a small map takes a
        fraction of a millisecond, so every extra call shows: the routing MLP
        runs as two ``addmm`` on cached transposed weights (``addmm`` on a
        transposed view is several times slower), and batch 1 runs the plain,
        ungrouped conv.
        """
        if self.use_native and native.usable(x):
            return self._native_plan().forward(x)
        b, c = x.shape[:2]
        fc1, fc2 = self._fc
        w1t, w2t = self._cached(
            "routing_t", (fc1.weight, fc2.weight), lambda: (fc1.weight.t().contiguous(), fc2.weight.t().contiguous())
        )
        pooled = x.view(b, c, -1).mean(2) if x.is_contiguous() else x.mean((2, 3))
        z = torch.addmm(fc2.bias, torch.addmm(fc1.bias, pooled, w1t).relu_(), w2t)
        if self.activation == "softmax":
            a = torch.softmax(z if self.temperature == 1.0 else z / self.temperature, dim=1)
        else:
            a = torch.sigmoid(z) if self.activation == "sigmoid" else z
        kernels = self.kernels()
        weight = torch.mm(a, kernels.view(self.num_kernels, -1))
        bias = None if self.bias is None else torch.mm(a, self.bias).view(-1)
        if b == 1:
            return F.conv2d(x, weight.view(kernels.shape[1:]), bias, self.stride, self.padding, self.dilation, self.groups)
        y = F.conv2d(
            x.reshape(1, b * c, *x.shape[2:]),
            weight.view(b * self.out_channels, *kernels.shape[2:]),
            bias,
            self.stride,
            self.padding,
            self.dilation,
            b * self.groups,
        )
        return y.view(b, self.out_channels, *y.shape[2:])

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow per-sample loop computing the same function as ``forward``; for testing."""
        self._check_input(x)
        a = self.coefficients(x)
        kernels = self.kernels()
        outputs = []
        for i in range(x.shape[0]):
            weight = sum(a[i, k] * kernels[k] for k in range(self.num_kernels))
            bias = None
            if self.bias is not None:
                bias = sum(a[i, k] * self.bias[k] for k in range(self.num_kernels))
            outputs.append(F.conv2d(x[i : i + 1], weight, bias, self.stride, self.padding, self.dilation, self.groups))
        return torch.cat(outputs)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, noise_std: float = 0.01, generator: torch.Generator | None = None,
                  **options: Any) -> DynamicConv2d:
        """A dynamic conv (of this class, with constructor ``options`` beyond the geometry) that computes the
        same function as ``conv`` when ``noise_std`` is 0.

        The last routing layer's weight is zeroed so the coefficients are
        constant, and the static kernels are scaled so that their mixture
        equals the dense kernel; ``noise_std`` (relative to the dense
        weight's std) then perturbs each kernel so they can diverge.
        """
        module = cls(**conv_geometry(conv), **options)
        module.load_dense(conv, noise_std, generator)
        return module

    @torch.no_grad()
    def load_dense(self, conv: nn.Conv2d, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """Carry ``conv``'s weight and bias into the K kernels (see ``from_conv``)."""
        if float(noise_std) < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        dense = conv.weight.detach()
        if tuple(dense.shape) != tuple(self.weight.shape[1:]):
            raise ValueError(f"conv weight shape {list(dense.shape)} does not match {list(self.weight.shape[1:])}")
        k = self.num_kernels
        # Constant coefficients: linear a_k = 1/K, sigmoid(0) = 1/2, softmax(0) = 1/K.
        coeff = {"linear": 1.0 / k, "sigmoid": 0.5, "softmax": 1.0 / k}[self.activation]
        scale = 1.0 / (coeff * k)
        last = self.routing[-1]
        last.weight.zero_()
        last.bias.fill_(1.0 / k if self.activation == "linear" else 0.0)

        self.to(device=dense.device, dtype=dense.dtype)
        self.weight.copy_(dense.unsqueeze(0).expand_as(self.weight) * scale)
        if noise_std > 0:
            std = dense.std(correction=0)
            noise = torch.randn(self.weight.shape, generator=generator, device=dense.device, dtype=dense.dtype)
            self.weight.add_(noise * (noise_std * std))
        if self.bias is not None:
            self.bias.copy_(conv.bias.detach().unsqueeze(0).expand_as(self.bias) * scale)

    def macs(self, input_shape: tuple[int, int, int]) -> dict[str, int]:
        """Multiply-accumulates per image of shape (C, H, W)."""
        c, h, w = input_shape
        if c != self.in_channels:
            raise ValueError(f"input_shape channels must be {self.in_channels}, got {c}")
        h_out, w_out = self.output_hw(h, w)
        kernel_numel = self.weight[0].numel()
        conv = h_out * w_out * kernel_numel
        aggregation = self.num_kernels * kernel_numel
        if self.bias is not None:
            aggregation += self.num_kernels * self.out_channels
        routing = self.in_channels * self.hidden + self.hidden * self.num_kernels
        return {"conv": conv, "aggregation": aggregation, "routing": routing, "total": conv + aggregation + routing}

    def counted_macs(self, x: torch.Tensor) -> int:
        """MACs of a forward on ``x`` (the whole batch), for the MAC counter (``pipeline/complexity.py``)."""
        return int(self.macs(tuple(x.shape[1:]))["total"]) * x.shape[0]

    @torch.no_grad()
    def fold_batchnorm(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        """Fold an eval-mode BatchNorm (``y * scale + shift`` per output channel) into the K kernels and biases.

        Exact when the coefficients sum to 1 (softmax): ``sum_k a_k (W_k * s) = s * sum_k a_k W_k`` and the
        biases mix to ``sum_k a_k b'_k = b'``. Returns False (nothing changed) for the other activations.
        """
        if self.activation != "softmax":
            return False
        self.weight.mul_(scale.view(1, -1, 1, 1, 1))
        old = self.bias if self.bias is not None else torch.zeros(self.num_kernels, self.out_channels)
        self.bias = nn.Parameter(old * scale + shift)
        self._inference_cache.clear()
        return True

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"num_kernels={self.num_kernels}, activation={self.activation}, temperature={self.temperature:g}"
        )
