"""Sparse (gather / scatter) inference of DynConv gated blocks (Verelst &
Tuytelaars, "Dynamic Convolutions: Exploiting Spatial Sparsity for Faster
Inference", CVPR 2020).

``pipeline/ops/spatial_gate.py`` runs gated blocks dense-masked: every conv
covers the whole map and the outputs are multiplied by the masks, so they cost
as much as the dense block. The modules here execute the same equations only
where the masks are set, in eval mode:

- the mask unit's eval decision ``m`` (``MaskUnit.decide``) and its 3x3
  dilation ``d`` (``spatial_gate.dilate``: the union of the mask positions' 3x3
  windows);
- every BN is folded into the conv before it; the block's convs run at the
  positions of ``d`` (the first conv) or ``m`` (the others), and the residual
  branch is added into the shortcut, which is computed densely (identity, or
  the folded 1x1 projection).

Two engines compute this. On float32 CPU tensors the block runs as a one-block
plan of the compiled engine (``pipeline/ops/plan``, the rows ops of
``csrc/plan_rows.cpp``): the same ops, through the same ``plan_into``, that
run the block inside a whole-model plan. Everywhere else (other devices and
dtypes, no compiled kernels, an explicit mask) it runs in PyTorch, which is
also the reference the compiled path is tested against: the positions of
``d`` and ``m`` are gathered from a channels-last ``[N_positions, C]`` copy of
the input; a 1x1 conv is one matrix product over the gathered positions, a 3x3
conv multiplies the gathered 3x3 neighbourhoods ``[N, 9 * C_in]`` by the folded
``[9 * C_in, C_out]`` kernel, and the depthwise 3x3 weights and sums the 9
gathered taps. Features that a 3x3 conv reads outside the dilated mask are
zero, exactly as in the dense-masked computation (``d * act(...)``), so the
outputs equal the gated block's up to float rounding.

Equations (eval mode, ``m``, ``d`` binary):

- basic block: ``out = relu(shortcut(x) + m * bn2(conv2(d * relu(bn1(conv1(x))))))``
- inverted residual: ``out = x + m * bn3(conv3(m * act(bn2(conv2(d * act(bn1(conv1(x))))))))``,
  ``act`` = ReLU6.

Outputs are in ``torch.channels_last`` memory format (same values and shape as
the dense-masked block). Inference only: ``forward`` raises in training mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.ops import native
from pipeline.errors import UserError
from pipeline.ops.gated_resnet import GatedBottleneck, GatedResNetBasicBlock
from pipeline.ops.spatial_gate import GatedBasicBlock, GatedBlock, GatedInvertedResidual, MaskUnit, dilate, expand_mask

def _fold_bn(weight: Tensor, bn: nn.BatchNorm2d, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``bn(conv(x)) = conv_w'(x) + b'`` in eval mode: scale the output channels, shift the bias (float64 math)."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
        raise ValueError("only a BatchNorm2d with running statistics can be folded into its conv")
    w = weight.detach().double()
    scale = torch.ones_like(bn.running_var, dtype=torch.float64) if bn.weight is None else bn.weight.detach().double()
    scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = torch.zeros_like(scale) if bn.bias is None else bn.bias.detach().double()
    base = torch.zeros_like(scale) if bias is None else bias.detach().double()
    folded_w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    folded_b = (base - bn.running_mean.double()) * scale + shift
    return folded_w.to(weight.dtype), folded_b.to(weight.dtype)


def _projection(shortcut: nn.Module | None, stride: int) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """The folded (weight, bias) of a block's 1x1 projection shortcut (``nn.Sequential(conv, bn)``), or
    ``(None, None)`` for the identity (``nn.Identity`` in the CIFAR block, ``None`` in torchvision's)."""
    if shortcut is None or isinstance(shortcut, nn.Identity):
        return None, None
    conv, bn = shortcut[0], shortcut[1]
    if conv.kernel_size != (1, 1) or conv.stride != (stride, stride) or conv.padding != (0, 0) or conv.groups != 1:
        raise ValueError("the projection shortcut must be a 1x1 conv with the block's stride")
    return _fold_bn(conv.weight, bn, conv.bias)


def _window_table(batch: int, in_h: int, in_w: int, out_h: int, out_w: int, stride: int,
                  device: torch.device) -> Tensor:
    """``[batch * out_h * out_w, 9]`` row numbers of the 3x3 windows (padding 1, ``stride``) of every output
    position in a table whose row 0 is zeros and row ``1 + p`` holds flat input position
    ``p = (b * in_h + y) * in_w + x``; taps outside the image point at row 0 (the convs' zero padding)."""
    gy = torch.arange(out_h, device=device).view(-1, 1, 1, 1) * stride - 1
    gx = torch.arange(out_w, device=device).view(1, -1, 1, 1) * stride - 1
    ly = torch.arange(3, device=device).view(1, 1, -1, 1)
    lx = torch.arange(3, device=device).view(1, 1, 1, -1)
    y, x = gy + ly, gx + lx
    inside = (y >= 0) & (y < in_h) & (x >= 0) & (x < in_w)
    local = torch.where(inside, 1 + y * in_w + x, torch.zeros((), dtype=torch.long, device=device))
    offsets = torch.arange(batch, device=device).view(-1, 1, 1, 1, 1) * (in_h * in_w)
    table = torch.where(inside, local + offsets, local.expand(batch, -1, -1, -1, -1))
    return table.reshape(batch * out_h * out_w, 9)


def _check_input(x: Tensor, channels: int, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: expected a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} input channels, got {x.shape[1]}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty input of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point input, got {x.dtype}")


def _as_nchw(rows: Tensor, b: int, h: int, w: int) -> Tensor:
    """``[B*H*W, C]`` channels-last rows as a ``[B, C, H, W]`` tensor (channels_last memory format, no copy)."""
    return rows.view(b, h, w, rows.shape[-1]).permute(0, 3, 1, 2)


def _shortcut(rows: Tensor, size: tuple[int, int, int], stride: int, ws: Tensor | None, bs: Tensor | None) -> Tensor:
    """The shortcut as fresh ``[B*H'*W', C_out]`` rows: a copy of the input rows ``[B*H*W, C]`` (identity), or
    the folded 1x1 projection at ``stride``."""
    if ws is None:
        return rows.clone(memory_format=torch.contiguous_format)
    b, h, w = size
    strided = rows.view(b, h, w, rows.shape[1])[:, ::stride, ::stride].reshape(-1, rows.shape[1])
    return torch.addmm(bs, strided, ws.view(ws.shape[0], -1).t())


def _with_zero_row(n: int, width: int, like: Tensor) -> Tensor:
    """Uninitialised ``[1 + n, width]`` buffer whose row 0 is zeros."""
    buf = torch.empty(n + 1, width, dtype=like.dtype, device=like.device)
    buf[0].zero_()
    return buf


class _Masks(NamedTuple):
    """The masks of a PyTorch forward (flat positions index the ``B*H'*W'`` output map)."""

    idx_m: Tensor  # flat mask positions
    idx_d: Tensor  # flat dilated positions
    window: Tensor  # [N_m, 9] 3x3 window rows of the mask positions (as in _window_table)
    ranks: Tensor  # [1 + B*H'*W']: entry 1 + p is the row of position p in a table of the dilated positions after
    # a zero row (0 where p is outside the dilated mask); entry 0 (outside the image) is 0


def _tensor_key(t: Tensor) -> tuple[int, int, int]:
    try:
        version = t._version
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return id(t), t.data_ptr(), version


class _SparseBlock(nn.Module):
    """Shared parts: eval-only guard, the two engines, the masks of the last forward, the MAC count.

    ``use_native`` (a plain attribute, default True): run float32 CPU inputs through the compiled engine;
    False runs the PyTorch reference.
    """

    gate: MaskUnit

    def __init__(self) -> None:
        super().__init__()
        self.use_native = True
        self.dilated_cost = 0
        self.masked_cost = 0
        self.shortcut_cost = 0
        # Plain dicts: nn.Module.__setattr__ is slow enough to show in a small block's forward.
        self._last: dict[str, object] = {}  # mask, dilated, floats, dtype, in_size, path of the last forward
        self._tables: dict[tuple, Tensor] = {}
        self._cache: dict[str, tuple] = {}  # plans derived from parameters or buffers

    @staticmethod
    def _require_eval_gated(block: nn.Module, kinds: tuple[type, ...]) -> None:
        """The checks every ``from_gated`` starts with: a gated block of one of ``kinds``, in eval mode."""
        if not isinstance(block, kinds):
            raise ValueError(f"from_gated expects a {kinds[0].__name__}, got {type(block).__name__}")
        if block.training:
            raise ValueError("from_gated needs an eval-mode block (BN running statistics are folded): call .eval()")

    def _copy_costs(self, block: GatedBasicBlock | GatedInvertedResidual) -> None:
        self.dilated_cost, self.masked_cost, self.shortcut_cost = (
            block.dilated_cost, block.masked_cost, block.shortcut_cost)

    # ------------------------------------------------------------------ masks of the last forward
    @property
    def last_mask(self) -> Tensor | None:
        """The mask ``[B, 1, H', W']`` (0/1, the input's dtype) of the last forward."""
        masks = self._floats()
        return None if masks is None else masks[0]

    @property
    def last_dilated(self) -> Tensor | None:
        """The dilated mask ``[B, 1, H', W']`` (0/1, the input's dtype) of the last forward."""
        masks = self._floats()
        return None if masks is None else masks[1]

    def _floats(self) -> tuple[Tensor, Tensor] | None:
        last = self._last
        if not last:
            return None
        if "floats" not in last:
            last["floats"] = (last["mask"].to(last["dtype"]), last["dilated"].to(last["dtype"]))
        return last["floats"]

    @property
    def last_path(self) -> str | None:
        """Which engine ran the last forward: ``"native"`` (the compiled one-block plan) or ``"pytorch"``."""
        return self._last.get("path")

    def _set_masks(self, x: Tensor, mask: Tensor, dilated: Tensor, path: str) -> None:
        last = self._last
        last.clear()
        last.update(mask=mask, dilated=dilated, dtype=x.dtype, in_size=(x.shape[-2], x.shape[-1]), path=path)

    @torch.no_grad()
    def macs_per_image(self) -> Tensor:
        """MACs per image ``[B]`` (float64) of the last forward: mask unit + executed positions + projection
        shortcut (the count of ``GatedBlock.macs_per_image``)."""
        if not self._last:
            raise RuntimeError(f"{type(self).__name__}: run a forward pass before asking for its cost")
        mask, dilated = (t.double() for t in self._floats())
        executed = dilated.sum(dim=(1, 2, 3)) * self.dilated_cost + mask.sum(dim=(1, 2, 3)) * self.masked_cost
        gate = self.gate.macs((self.gate.in_channels, *self._last["in_size"]))
        return executed + gate + mask.shape[-2] * mask.shape[-1] * self.shortcut_cost

    def counted_macs(self, x: Tensor) -> int:
        """MACs of the forward that just ran (the whole batch), for the MAC counter (``pipeline/complexity.py``)."""
        return int(self.macs_per_image().sum().item())

    # ------------------------------------------------------------------ entry points
    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode block output with the mask unit's own mask (``MaskUnit.decide``)."""
        self._require_eval()
        self._check(x)
        if self.use_native and native.usable(x):
            plan = self._native_plan(tuple(x.shape[1:]))
            if plan is not None:
                out, mask, dilated = plan.forward_maps(x)
                self._set_masks(x, mask, dilated, "native")
                return out
        with torch.no_grad():
            return self._run(x, self.gate.decide(x))

    def forward_with_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """Eval-mode block output with an explicit 0/1 mask ``[B, 1, H', W']`` at the output resolution (the
        mask unit does not run; nonzero entries are active), in PyTorch."""
        self._require_eval()
        self._check(x)
        expected = (x.shape[0], 1, *self._out_size(x))
        if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
            raise ValueError(f"{type(self).__name__}: mask must have shape {expected}, "
                             f"got {getattr(mask, 'shape', type(mask).__name__)}")
        if mask.device != x.device:
            raise ValueError(f"{type(self).__name__}: mask is on {mask.device}, the input on {x.device}")
        with torch.no_grad():
            return self._run(x, mask != 0)

    # ------------------------------------------------------------------ the compiled engine
    def _native_plan(self, shape: tuple[int, ...]) -> object | None:
        """The one-block plan for inputs [B, *shape] (rebuilt when a parameter or buffer changed), or None when
        the engine cannot take the block."""
        sources = (*self.gate.parameters(), *(t for t in self._buffers.values() if t is not None))
        return self._derived(f"plan{shape}", sources, partial(self._compile, shape))

    def _compile(self, shape: tuple[int, ...], *_sources: Tensor) -> object | None:
        from pipeline.ops.plan.builder import PlanBuilder, Unsupported

        try:
            b = PlanBuilder(shape)
            out = self.plan_into(b, type(self).__name__, 0)
        except Unsupported:
            return None
        b.outputs(out, *b.gate_maps[-1])
        return b.plan

    def _derived(self, name: str, sources: tuple[Tensor, ...], make: Callable[..., object]):
        """``make(*sources)``, cached until a source is replaced or changed in place."""
        key = tuple(map(_tensor_key, sources))
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                hit = (key, make(*sources))
            self._cache[name] = hit
        return hit[1]

    # ------------------------------------------------------------------ the PyTorch engine
    def _masks(self, x: Tensor, mask: Tensor, b: int, h: int, w: int) -> _Masks | None:
        """The mask ``mask`` (bool) at the output resolution ``h`` x ``w``, its dilation, the positions of each
        and the mask positions' 3x3 windows; None (the shortcut alone) when no position is active."""
        dilated = dilate(mask.to(x.dtype)) > 0
        self._set_masks(x, mask, dilated, "pytorch")
        idx_m = mask.reshape(-1).nonzero().view(-1)
        if idx_m.numel() == 0:
            return None
        window = self._table(b, h, w, h, w, 1, x.device).index_select(0, idx_m)
        flags = torch.cat([dilated.new_zeros(1), dilated.reshape(-1)])
        return _Masks(idx_m, dilated.reshape(-1).nonzero().view(-1), window, torch.cumsum(flags, 0))

    def _table(self, *key: object) -> Tensor:
        table = self._tables.get(key)
        if table is None:
            # Normal tensors even when built under inference_mode, so any later forward may use them.
            with torch.inference_mode(False):
                table = _window_table(*key)
            if len(self._tables) >= 64:
                self._tables.clear()
            self._tables[key] = table
        return table

    def _require_eval(self) -> None:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is for inference only: call .eval() first "
                               "(train the gated block it was made from instead)")

    def _check(self, x: Tensor) -> None:
        raise NotImplementedError

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        raise NotImplementedError

    def _run(self, x: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.update(_last={}, _tables={}, _cache={})
        return state


class SparseInvertedResidual(_SparseBlock):
    """Gather / scatter inference of a ``GatedInvertedResidual`` (Verelst & Tuytelaars, CVPR 2020).

    ``out = x + m * bn3(conv3(m * act(bn2(conv2(d * act(bn1(conv1(x))))))))``, act = ReLU6: the 1x1
    expansion runs at the dilated positions ``d``, the depthwise 3x3 (reading its neighbourhood from those
    features, zero elsewhere) and the 1x1 projection at the mask positions ``m`` (the official MobileNetV2
    code's masks); the result is added into the identity shortcut. Buffers ``w1, b1, w2, b2, w3, b3`` are
    the BN-folded conv weights and biases.
    """

    def __init__(self, gate: MaskUnit, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor):
        super().__init__()
        self.gate = gate
        self.hidden, self.in_channels = w1.shape[:2]
        self.register_buffer("w1", w1)  # [hidden, C, 1, 1]
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2)  # [hidden, 1, 3, 3] depthwise
        self.register_buffer("b2", b2)
        self.register_buffer("w3", w3)  # [C, hidden, 1, 1]
        self.register_buffer("b3", b3)

    @classmethod
    def from_gated(cls, block: GatedInvertedResidual) -> SparseInvertedResidual:
        """Sparse copy of an eval-mode gated block: BNs folded once, the mask unit copied as is."""
        cls._require_eval_gated(block, (GatedInvertedResidual,))
        if not isinstance(block.act, nn.ReLU6):
            raise ValueError(f"expected ReLU6 activations, got {type(block.act).__name__}")
        hidden = block.conv2.out_channels
        if (block.conv2.groups != hidden or block.conv2.kernel_size != (3, 3) or block.conv2.padding != (1, 1)
                or block.conv2.stride != (1, 1) or block.conv1.kernel_size != (1, 1)
                or block.conv3.kernel_size != (1, 1)):
            raise ValueError("expected 1x1 - depthwise 3x3 (stride 1, padding 1) - 1x1 convs")
        folded = [_fold_bn(conv.weight, bn, conv.bias)
                  for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3))]
        sparse = cls(copy.deepcopy(block.gate), *(t.contiguous() for pair in folded for t in pair))
        sparse._copy_costs(block)
        return sparse.eval()

    def plan_into(self, b, name: str, x: int) -> int:
        """The block in the compiled engine (``pipeline/ops/plan``), on rows: mask unit, the 1x1 expansion +
        ReLU6 at the dilated mask's positions, the depthwise 3x3 + ReLU6 and the 1x1 projection (added to the
        input) at the mask's, the input passing alone elsewhere."""
        p = self._buffers
        x = b.as_rows(x)
        gate = self.gate.plan_into(b, f"{name}.gate", x, 1)
        b.watch(*p.values())
        t = b.rows_conv(x, p["w1"], p["b1"], 1, b.ACT_RELU6, gate=gate, which=0)
        t = b.rows_depthwise(t, p["w2"], p["b2"], b.ACT_RELU6, gate=gate, which=1)
        return b.rows_conv(t, p["w3"], p["b3"], 1, b.ACT_NONE, res=x, gate=gate, which=1)

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.in_channels, type(self).__name__)

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        return x.shape[2], x.shape[3]

    def _run(self, x: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self._buffers
        hid = self.hidden
        masks = self._masks(x, mask, b, h, w)
        if masks is None:
            return x.clone(memory_format=torch.channels_last)
        # The shortcut as channels-last rows [B*H*W, C], a copy of x (scatter-added into below).
        out = x.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).view(-1, c)
        expanded = _with_zero_row(masks.idx_d.numel(), hid, out)  # zero row: what conv2 reads outside d
        torch.addmm(p["b1"], out.index_select(0, masks.idx_d), p["w1"].view(hid, c).t(), out=expanded[1:])
        expanded.clamp_(0.0, 6.0)
        taps = expanded.index_select(0, masks.ranks.index_select(0, masks.window.view(-1))).view(-1, 9, hid)
        hidden = taps.mul_(p["w2"].view(hid, 9).t()).sum(1).add_(p["b2"]).clamp_(0.0, 6.0)
        out.index_add_(0, masks.idx_m, torch.addmm(p["b3"], hidden, p["w3"].view(c, hid).t()))
        return _as_nchw(out, b, h, w)


class SparseBasicBlock(_SparseBlock):
    """Gather / scatter inference of a ``GatedBasicBlock`` (Verelst & Tuytelaars, CVPR 2020).

    ``out = relu(shortcut(x) + m * bn2(conv2(d * relu(bn1(conv1(x))))))``: conv1 (3x3, stride s) runs
    at the dilated positions ``d`` on gathered input neighbourhoods, conv2 at the mask positions ``m`` on
    gathered neighbourhoods of those features (zero outside ``d``); the result is added into the shortcut
    (identity, or the folded 1x1 projection, computed everywhere), then ReLU. Buffers ``w1, b1, w2, b2``
    (and ``ws, bs`` for a projection shortcut) are the BN-folded conv weights (channels_last) and biases.
    """

    def __init__(self, gate: MaskUnit, stride: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 ws: Tensor | None, bs: Tensor | None):
        super().__init__()
        self.gate = gate
        self.stride = stride
        self.out_channels, self.in_channels = w1.shape[:2]
        # channels_last kernels: their (ky, kx, c_in) rows are the matrix the gathered neighbourhoods meet.
        self.register_buffer("w1", w1.contiguous(memory_format=torch.channels_last))  # [C_out, C_in, 3, 3]
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2.contiguous(memory_format=torch.channels_last))  # [C_out, C_out, 3, 3]
        self.register_buffer("b2", b2)
        self.register_buffer("ws", None if ws is None else ws.contiguous())  # [C_out, C_in, 1, 1]
        self.register_buffer("bs", bs)

    @classmethod
    def from_gated(cls, block: GatedBasicBlock | GatedResNetBasicBlock) -> SparseBasicBlock:
        """Sparse copy of an eval-mode gated block (the CIFAR one or torchvision's): BNs folded once, the mask
        unit copied as is."""
        cls._require_eval_gated(block, (GatedBasicBlock, GatedResNetBasicBlock))
        for conv in (block.conv1, block.conv2):
            if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1):
                raise ValueError("conv1 and conv2 must be plain 3x3 convs with padding 1")
        stride = block.conv1.stride[0]
        if block.conv1.stride != (stride, stride) or block.conv2.stride != (1, 1) or block.gate.stride != stride:
            raise ValueError("conv1 and the mask unit must share one square stride, conv2 must have stride 1")
        if not isinstance(block.relu, nn.ReLU):
            raise ValueError(f"expected ReLU activations, got {type(block.relu).__name__}")
        w1, b1 = _fold_bn(block.conv1.weight, block.bn1, block.conv1.bias)
        w2, b2 = _fold_bn(block.conv2.weight, block.bn2, block.conv2.bias)
        shortcut = block.downsample if isinstance(block, GatedResNetBasicBlock) else block.shortcut
        ws, bs = _projection(shortcut, stride)
        if ws is None and (stride != 1 or block.conv1.in_channels != block.conv1.out_channels):
            raise ValueError("an identity shortcut needs stride 1 and equal widths")
        sparse = cls(copy.deepcopy(block.gate), stride, w1, b1, w2, b2, ws, bs)
        sparse._copy_costs(block)
        return sparse.eval()

    plan_reads_rows = True  # in the whole-model plan its input is rows: the op before may write them directly

    def plan_into(self, b, name: str, x: int) -> int:
        """The block in the compiled engine (``pipeline/ops/plan``), on rows (position-major): mask unit,
        shortcut at every position, conv1 at the dilated mask's positions, conv2 at the mask's (added to the
        shortcut, which passes alone elsewhere), ReLU after the sum."""
        p, s = self._buffers, self.stride
        x = b.as_rows(x)
        gate = self.gate.plan_into(b, f"{name}.gate", x, s)
        b.watch(*[t for t in p.values() if t is not None])
        res = x
        if p["ws"] is not None:
            res = b.rows_conv(x, p["ws"], p["bs"], s)
        t = b.rows_conv(x, p["w1"], p["b1"], s, b.ACT_RELU, gate=gate, which=0)
        return b.rows_conv(t, p["w2"], p["b2"], 1, b.ACT_RELU, res=res, gate=gate, which=1)

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.in_channels, type(self).__name__)

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        s = self.stride
        return (x.shape[2] - 1) // s + 1, (x.shape[3] - 1) // s + 1

    @staticmethod
    def _matrix(weight: Tensor) -> Tensor:
        """``[C_out, C_in, 3, 3]`` kernel as the ``[9 * C_in, C_out]`` matrix of (ky, kx, c_in) rows (a view for
        a channels_last kernel)."""
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).t()

    def _run(self, x: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ho, wo = self._out_size(x)
        s, co = self.stride, self.out_channels
        p = self._buffers
        masks = self._masks(x, mask, b, ho, wo)
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels_last input, else a copy
        out = _shortcut(rows, (b, h, w), s, p["ws"], p["bs"])
        if masks is not None:
            source = torch.cat([rows.new_zeros(1, c), rows])  # row 0: what the conv padding reads
            window_in = self._table(b, h, w, ho, wo, s, x.device)
            cols = source.index_select(0, window_in.index_select(0, masks.idx_d).view(-1)).view(-1, 9 * c)
            hidden = _with_zero_row(masks.idx_d.numel(), co, x)  # zero row: what conv2 reads outside d
            torch.addmm(p["b1"], cols, self._matrix(p["w1"]), out=hidden[1:])
            hidden.relu_()
            cols = hidden.index_select(0, masks.ranks.index_select(0, masks.window.view(-1))).view(-1, 9 * co)
            out.index_add_(0, masks.idx_m, torch.addmm(p["b2"], cols, self._matrix(p["w2"])))
        return _as_nchw(out.relu_(), b, ho, wo)


class SparseBottleneck(_SparseBlock):
    """Gather / scatter inference of torchvision's gated bottleneck, ``GatedBottleneck`` (Verelst &
    Tuytelaars, CVPR 2020; the official ImageNet code's masks).

    ``out = relu(shortcut(x) + m * bn3(conv3(relu(bn2(conv2(e * relu(bn1(conv1(x)))))))))``: conv1 (1x1) runs
    at the input positions ``e`` that conv2 reads for the mask (``expand_mask``: the mask spread onto the
    input grid at the block's stride, dilated 3x3), conv2 (3x3, stride s) at the mask positions ``m`` on
    gathered neighbourhoods of those features (zero outside ``e``), conv3 (1x1) at ``m``; the result is added
    into the shortcut (identity, or the folded 1x1 projection, computed everywhere), then ReLU. Buffers
    ``w1, b1, w2, b2, w3, b3`` (and ``ws, bs`` for a projection) are the BN-folded conv weights and biases.

    ``last_dilated`` is ``e``, at the input's resolution (the resolution conv1 runs at).
    """

    def __init__(self, gate: MaskUnit, stride: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                 b3: Tensor, ws: Tensor | None, bs: Tensor | None):
        super().__init__()
        self.gate = gate
        self.stride = stride
        self.width, self.in_channels = w1.shape[:2]
        self.out_channels = w3.shape[0]
        self.register_buffer("w1", w1.contiguous())  # [width, C_in, 1, 1]
        self.register_buffer("b1", b1)
        self.register_buffer("w2", w2.contiguous(memory_format=torch.channels_last))  # [width, width, 3, 3]
        self.register_buffer("b2", b2)
        self.register_buffer("w3", w3.contiguous())  # [C_out, width, 1, 1]
        self.register_buffer("b3", b3)
        self.register_buffer("ws", None if ws is None else ws.contiguous())  # [C_out, C_in, 1, 1]
        self.register_buffer("bs", bs)

    @classmethod
    def from_gated(cls, block: GatedBottleneck) -> SparseBottleneck:
        """Sparse copy of an eval-mode gated bottleneck: BNs folded once, the mask unit copied as is."""
        cls._require_eval_gated(block, (GatedBottleneck,))
        stride = block.conv2.stride[0]
        c1, c2, c3 = block.conv1, block.conv2, block.conv3
        if (c1.kernel_size != (1, 1) or c3.kernel_size != (1, 1) or c1.stride != (1, 1) or c3.stride != (1, 1)
                or c2.kernel_size != (3, 3) or c2.padding != (1, 1) or c2.dilation != (1, 1)
                or any(c.groups != 1 for c in (c1, c2, c3)) or c2.stride != (stride, stride)
                or block.gate.stride != stride):
            raise ValueError("expected 1x1 - 3x3 (padding 1, the mask unit's stride) - 1x1 ungrouped convs")
        if not isinstance(block.relu, nn.ReLU):
            raise ValueError(f"expected ReLU activations, got {type(block.relu).__name__}")
        ws, bs = _projection(block.downsample, stride)
        if ws is None and (stride != 1 or c1.in_channels != c3.out_channels):
            raise ValueError("an identity shortcut needs stride 1 and equal widths")
        folded = [_fold_bn(conv.weight, bn, conv.bias) for conv, bn in ((c1, block.bn1), (c2, block.bn2),
                                                                           (c3, block.bn3))]  # fmt: skip
        sparse = cls(copy.deepcopy(block.gate), stride, *(t for pair in folded for t in pair), ws, bs)
        sparse._copy_costs(block)
        return sparse.eval()

    def plan_into(self, b, name: str, x: int) -> int:
        """The block in the compiled engine (``pipeline/ops/plan``), on rows: mask unit, shortcut at every
        position, conv1 at the dilated mask (a strided block: at the expanded mask on the input grid), conv2
        and conv3 at the mask (added to the shortcut, which passes alone elsewhere), ReLU after the sum."""
        p, s = self._buffers, self.stride
        x = b.as_rows(x)
        gate = self.gate.plan_into(b, f"{name}.gate", x, s, expand=s != 1)
        b.watch(*[t for t in p.values() if t is not None])
        res = x if p["ws"] is None else b.rows_conv(x, p["ws"], p["bs"], s)
        t = b.rows_conv(x, p["w1"], p["b1"], 1, b.ACT_RELU, gate=gate, which=0 if s == 1 else 2)
        t = b.rows_conv(t, p["w2"], p["b2"], s, b.ACT_RELU, gate=gate, which=1)
        return b.rows_conv(t, p["w3"], p["b3"], 1, b.ACT_RELU, res=res, gate=gate, which=1)

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.in_channels, type(self).__name__)

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        s = self.stride
        return (x.shape[2] - 1) // s + 1, (x.shape[3] - 1) // s + 1

    def _run(self, x: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ho, wo = self._out_size(x)
        s, width = self.stride, self.width
        p = self._buffers
        expanded = expand_mask(mask.to(x.dtype), s, (h, w)) > 0
        self._set_masks(x, mask, expanded, "pytorch")
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels_last input, else a copy
        out = _shortcut(rows, (b, h, w), s, p["ws"], p["bs"])
        idx_m = mask.reshape(-1).nonzero().view(-1)
        if idx_m.numel() > 0:
            idx_e = expanded.reshape(-1).nonzero().view(-1)
            hidden = _with_zero_row(idx_e.numel(), width, x)  # zero row: what conv2 reads outside e
            torch.addmm(p["b1"], rows.index_select(0, idx_e), p["w1"].view(width, c).t(), out=hidden[1:])
            hidden.relu_()
            # Entry 1 + p: the row of input position p in `hidden` when p is in e (the windows of the mask's
            # positions read no other); entry 0, the padding, the zero row.
            ranks = torch.cumsum(torch.cat([expanded.new_zeros(1), expanded.reshape(-1)]), 0)
            window = self._table(b, h, w, ho, wo, s, x.device).index_select(0, idx_m)
            cols = hidden.index_select(0, ranks.index_select(0, window.view(-1))).view(-1, 9 * width)
            h2 = torch.addmm(p["b2"], cols, SparseBasicBlock._matrix(p["w2"])).relu_()
            out.index_add_(0, idx_m, torch.addmm(p["b3"], h2, p["w3"].view(self.out_channels, width).t()))
        return _as_nchw(out.relu_(), b, ho, wo)


_SPARSE: dict[type[GatedBlock], type[_SparseBlock]] = {
    GatedBasicBlock: SparseBasicBlock,
    GatedResNetBasicBlock: SparseBasicBlock,
    GatedInvertedResidual: SparseInvertedResidual,
    GatedBottleneck: SparseBottleneck,
}


def to_sparse_execution(model: nn.Module) -> nn.Module:
    """Deep copy of an eval-mode ``model`` with every DynConv gated block (the CIFAR basic block, the inverted
    residual, torchvision's basic block and bottleneck) replaced by its gather / scatter counterpart under the
    same module name (DynConv, Verelst & Tuytelaars, CVPR 2020), for inference."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_sparse_execution expects an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("to_sparse_execution needs an eval-mode model (BN statistics are folded): call .eval()")
    sparse = copy.deepcopy(model)
    for name, module in list(sparse.named_modules()):
        sparse_type = _SPARSE.get(type(module))
        if sparse_type is not None:
            new: nn.Module = sparse_type.from_gated(module)
        elif isinstance(module, GatedBlock):
            raise UserError(f"{name}: no sparse execution of a {type(module).__name__} yet (its dense-masked "
                            "forward gives the same outputs; time the masked variant)")
        else:
            continue
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(sparse.get_submodule(parent) if parent else sparse, child, new)
    return sparse.eval()
