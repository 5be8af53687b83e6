"""ODConv: omni-dimensional dynamic convolution (Li, Zhou, Yao, "Omni-Dimensional Dynamic
Convolution", ICLR 2022).

n static kernels W_1..W_n, and four attentions computed per sample from one
squeeze branch (global average pool -> FC to a hidden width -> BN -> ReLU):

    y = (sum_i a_wi * a_f * a_c * a_s * W_i) * x                    (Eq. 3 of the paper)

with ``a_s`` over the k x k kernel positions, ``a_c`` over the input
channels, ``a_f`` over the output filters (each ``sigmoid(z / T)``, shared by
the n kernels as in the official implementation) and ``a_w`` over the
kernels (``softmax(z / T)``). With a_s = a_c = a_f = 1 it is DY-Conv. As in
the official code, the kernel attention is left out for n = 1, the filter
attention for depthwise convs and the spatial one for 1x1 kernels; any of the
four can also be switched off (``attentions``) to ablate it, an attention
that is off being 1.

Execution: ``a_c`` scales the input, ``a_s`` and ``a_w`` mix the per-sample
kernel (one ``[B, n] x [n, P]`` product), the B per-sample convs run as one
grouped conv, and ``a_f`` scales the output; ``forward_reference`` is the
per-sample loop of Eq. 3, for testing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.ops.dynamic_conv import ConvShape

ATTENTIONS = ("spatial", "channel", "filter", "kernel")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
        raise ValueError(f"expected an int or a pair of ints >= 0, got {value!r}")
    return pair  # type: ignore[return-value]


class ODConv2d(ConvShape, nn.Module):
    """Omni-dimensional dynamic convolution (Li, Zhou, Yao, ICLR 2022, Eq. 3); see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        num_kernels: int = 4,
        reduction: float = 0.0625,
        min_hidden: int = 16,
        temperature: float = 1.0,
        attentions: Sequence[str] = ATTENTIONS,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if num_kernels < 1:
            raise ValueError(f"num_kernels must be >= 1, got {num_kernels}")
        unknown = set(attentions) - set(ATTENTIONS)
        if unknown:
            raise ValueError(f"attentions must be among {ATTENTIONS}, got {sorted(unknown)}")
        if num_kernels > 1 and "kernel" not in attentions:
            raise ValueError("the kernel attention mixes the n kernels: it cannot be off with num_kernels > 1")
        if not (0 < reduction <= 1):
            raise ValueError(f"reduction must be in (0, 1], got {reduction}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.num_kernels, self.reduction, self.min_hidden = num_kernels, reduction, min_hidden
        self.temperature = float(temperature)
        self.hidden = max(int(in_channels * reduction), min_hidden)
        kh, kw = self.kernel_size
        # The official code's special cases, then the ablation switches.
        active = {
            "spatial": "spatial" in attentions and kh * kw > 1,
            "channel": "channel" in attentions,
            "filter": "filter" in attentions and not (groups == in_channels == out_channels),
            "kernel": "kernel" in attentions and num_kernels > 1,
        }
        self.attentions = tuple(a for a in ATTENTIONS if active[a])
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, in_channels // groups, kh, kw))
        self.register_parameter("bias", None)  # set by BN folding (fold_batchnorm)
        self.fc = nn.Linear(in_channels, self.hidden, bias=False)
        self.bn = nn.BatchNorm1d(self.hidden)
        sizes = {"spatial": kh * kw, "channel": in_channels, "filter": out_channels, "kernel": num_kernels}
        self.heads = nn.ModuleDict({a: nn.Linear(self.hidden, sizes[a]) for a in self.attentions})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the official code: kaiming-normal (fan_out) kernels and attention layers, zero biases."""
        for w in self.weight:
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        for layer in (self.fc, *self.heads.values()):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": self.kernel_size,
                "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "num_kernels": self.num_kernels, "reduction": self.reduction, "min_hidden": self.min_hidden,
                "temperature": self.temperature, "attentions": self.attentions}  # fmt: skip

    def set_temperature(self, t: float) -> None:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        self.temperature = float(t)

    # ------------------------------------------------------------------ attentions
    def attention(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The active attentions of a batch: ``spatial`` [B, kh*kw], ``channel`` [B, C_in], ``filter``
        [B, C_out] (sigmoid(z / T)) and ``kernel`` [B, n] (softmax(z / T))."""
        h = F.relu(self.bn(self.fc(x.mean((2, 3)))))
        out = {}
        for name, head in self.heads.items():
            z = head(h) / self.temperature
            out[name] = torch.softmax(z, dim=1) if name == "kernel" else torch.sigmoid(z)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.forward_with(x, self.attention(x))

    def forward_with(self, x: torch.Tensor, att: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 3 with given attentions (a missing one is 1): input scaling, kernel mixing, one grouped conv,
        output scaling."""
        b, c, h, w = x.shape
        n, kh, kw = self.num_kernels, *self.kernel_size
        if "channel" in att:
            x = x * att["channel"].view(b, c, 1, 1)
        if "kernel" in att:
            weight = (att["kernel"] @ self.weight.reshape(n, -1)).view(b, *self.weight.shape[1:])
        else:
            weight = self.weight.sum(0, keepdim=True).expand(b, *self.weight.shape[1:])
        if "spatial" in att:
            weight = weight * att["spatial"].view(b, 1, 1, kh, kw)
        if b == 1:
            y = F.conv2d(x, weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * self.out_channels, -1, kh, kw), None,
                         self.stride, self.padding, self.dilation, b * self.groups)
            y = y.view(b, self.out_channels, *y.shape[2:])
        if "filter" in att:
            y = y * att["filter"].view(b, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Slow per-sample loop of Eq. 3: each sample's kernel sum_i a_wi * a_f * a_c * a_s * W_i, then a conv."""
        self._check_input(x)
        att = self.attention(x)
        ones = {"spatial": self.kernel_size[0] * self.kernel_size[1], "channel": self.in_channels // self.groups,
                "filter": self.out_channels, "kernel": self.num_kernels}
        outputs = []
        for i in range(x.shape[0]):
            a = {k: att[k][i] if k in att else x.new_ones(size) for k, size in ones.items()}
            if "channel" in att and self.groups > 1:
                raise NotImplementedError("the reference covers ungrouped convs")
            kernel = sum(
                a["kernel"][j] * a["filter"].view(-1, 1, 1, 1) * a["channel"].view(1, -1, 1, 1)
                * a["spatial"].view(1, 1, *self.kernel_size) * self.weight[j]
                for j in range(self.num_kernels)
            )
            outputs.append(F.conv2d(x[i : i + 1], kernel, self.bias, self.stride, self.padding, self.dilation,
                                    self.groups))
        return torch.cat(outputs)

    # ------------------------------------------------------------------ conversion, cost, folding
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, noise_std: float = 0.01, generator: torch.Generator | None = None,
                  **kwargs) -> ODConv2d:
        """An ODConv whose n kernels start as ``conv``'s kernel (``conv`` without bias) plus ``noise_std`` x its
        std of Gaussian noise, and whose attention heads start at weight 0 and bias 0: every sigmoid attention
        is 1/2 and the kernel attention 1/n for every input, so the output starts as ``start_scale`` x ``conv``'s.

        The kernels are not scaled up to undo ``start_scale``: kernels several times larger make the
        attention heads' gradients as many times larger, and fine-tuning diverges once the temperature
        reaches 1; the BatchNorm after the conv absorbs the scale (``rescale_following_bn``).
        """
        if conv.bias is not None:
            raise ValueError("from_conv expects a conv without bias (a BatchNorm follows it)")
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, **kwargs)
        with torch.no_grad():
            for head in module.heads.values():
                head.weight.zero_()
                head.bias.zero_()
            dense = conv.weight.detach()
            module.weight.copy_(dense.unsqueeze(0).expand_as(module.weight))
            if "kernel" not in module.attentions:  # n = 1: the kernels are summed
                module.weight.div_(module.num_kernels)
            if noise_std > 0:
                noise = torch.randn(module.weight.shape, generator=generator)
                module.weight.add_(noise * (noise_std * dense.std(correction=0)))
        return module

    @property
    def start_scale(self) -> float:
        """The output of a converted ODConv relative to the dense conv's while the heads are at 0: 1/2 per
        sigmoid attention."""
        return 0.5 ** sum(a != "kernel" for a in self.attentions)

    @torch.no_grad()
    def rescale_following_bn(self, bn: nn.BatchNorm2d) -> None:
        """Scale the running statistics of the BatchNorm after this conv by ``start_scale``, so that at eval the
        converted model computes the dense function (in training the batch statistics absorb it anyway)."""
        s = self.start_scale
        bn.running_mean.mul_(s)
        # sqrt(var' + eps) = s sqrt(var + eps) exactly
        bn.running_var.add_(bn.eps).mul_(s * s).sub_(bn.eps)

    def macs(self, input_shape: tuple[int, int, int]) -> dict[str, int]:
        """Multiply-accumulates per image of shape (C, H, W): conv, kernel mixing (a_w, a_s), input and output
        scaling (a_c, a_f) and the attention branch."""
        c, h, w = input_shape
        h_out, w_out = self.output_hw(h, w)
        kernel = self.weight[0].numel()
        conv = h_out * w_out * kernel
        mixing = (self.num_kernels * kernel if "kernel" in self.attentions else 0) + (
            kernel if "spatial" in self.attentions else 0)
        scaling = (c * h * w if "channel" in self.attentions else 0) + (
            self.out_channels * h_out * w_out if "filter" in self.attentions else 0)
        branch = self.in_channels * self.hidden + sum(head.out_features * self.hidden for head in self.heads.values())
        return {"conv": conv, "mixing": mixing, "scaling": scaling, "attention": branch,
                "total": conv + mixing + scaling + branch}

    def counted_macs(self, x: torch.Tensor) -> int:
        """MACs of a forward on ``x`` (the whole batch), for the MAC counter (``pipeline/complexity.py``)."""
        return int(self.macs(tuple(x.shape[1:]))["total"]) * x.shape[0]

    @torch.no_grad()
    def fold_batchnorm(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        """Fold an eval-mode BatchNorm after this conv: the n kernels scale per output filter and the shift
        becomes a bias added after the filter attention (exact: a_f multiplies before the bias)."""
        self.weight.mul_(scale.view(1, -1, 1, 1, 1))
        old = self.bias if self.bias is not None else torch.zeros(self.out_channels)
        self.bias = nn.Parameter(old * scale + shift)
        return True

    @torch.no_grad()
    def plan_into(self, b, name: str, x: int, res: int = -1, act: int = 0) -> int:
        """This conv in the compiled whole-model plan (``pipeline/ops/plan``), eval mode: the squeeze with its
        BatchNorm folded into the FC, the four heads in one routing, and a_w, a_s, a_c, a_f applied to the
        mixed kernel (Eq. 3: each scales it along one axis, so folding them there is exact); the bias is
        added after a_f, as in ``forward_with``."""
        from pipeline.ops.plan.builder import (CHANNEL, FILTER, KERNEL, SIGMOID, SOFTMAX, SPATIAL, Head, Routing,
                                               Unsupported, conv_geometry)  # fmt: skip

        ks, stride = conv_geometry(name, self.kernel_size, self.stride, self.padding, self.dilation)
        if self.bn.training or self.bn.running_var is None:
            raise Unsupported(f"{name}.bn: the squeeze's BatchNorm needs running statistics in eval mode")
        b.watch(*self.parameters(), *self.buffers())
        kernels = self.weight if "kernel" in self.attentions else self.weight.sum(0, keepdim=True)
        depthwise = self.groups == self.in_channels == self.out_channels and ks == 3
        if self.groups != 1 and not depthwise:
            raise Unsupported(f"{name}: a grouped ODConv other than depthwise 3x3 is not compiled")
        if not self.heads:  # every attention off: a static conv
            if depthwise:
                return b.depthwise(name, x, kernels, self.bias, None, stride, res, act)
            return b.static_conv(name, x, kernels[0], self.bias, stride, res, act)
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
        roles = {"kernel": KERNEL, "spatial": SPATIAL, "channel": CHANNEL, "filter": FILTER}
        heads = [Head(roles[a], head.out_features, SOFTMAX if a == "kernel" else SIGMOID, 1.0 / self.temperature)
                 for a, head in self.heads.items()]  # fmt: skip
        routing = Routing(self.fc.weight * scale[:, None], shift, torch.cat([h.weight for h in self.heads.values()]),
                          torch.cat([h.bias for h in self.heads.values()]), heads)  # fmt: skip
        if depthwise:
            return b.depthwise(name, x, kernels, self.bias, routing, stride, res, act)
        return b.mixture(name, x, kernels, self.bias, routing, stride, res, act)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, num_kernels={self.num_kernels}, attentions={self.attentions}, "
                f"temperature={self.temperature:g}")
