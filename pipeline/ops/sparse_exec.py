"""Sparse (gather / scatter) inference of DynConv gated blocks (Verelst &
Tuytelaars, "Dynamic Convolutions: Exploiting Spatial Sparsity for Faster
Inference", CVPR 2020).

``pipeline/ops/spatial_gate.py`` runs gated blocks dense-masked: every conv
covers the whole map and the outputs are multiplied by the masks, so they cost
as much as the dense block. The modules here execute the same equations only
where the masks are set, in eval mode:

- the mask unit's eval decision ``m = [logits >= 0]`` and its 3x3 dilation
  ``d`` (the union of the mask positions' 3x3 windows);
- the positions of ``d`` and ``m`` are gathered from a channels-last
  ``[N_positions, C]`` copy of the input; every BN is folded into the conv
  before it; a 1x1 conv is one matrix product over the gathered positions, a
  3x3 conv multiplies the gathered 3x3 neighbourhoods ``[N, 9 * C_in]`` by the
  folded ``[9 * C_in, C_out]`` kernel, and the depthwise 3x3 weights and sums
  the 9 gathered taps. With many active positions the 3x3 conv at the mask
  instead runs on gathered ``t x t`` tiles with a one-pixel halo (the
  convolution backend on small images) and keeps the mask positions;
- the residual branch is scatter-added into the shortcut, which is computed
  densely (identity, or the folded 1x1 projection), as in the gated block.

Features that a 3x3 conv reads outside the dilated mask are zero, exactly as in
the dense-masked computation (``d * act(...)``), so the outputs equal the gated
block's up to float rounding. When more than ``dense_above`` of the positions
are active, the gathers cost more than they skip: the block then runs its folded
convs densely and multiplies the mask into the branch output, the same function
(a conv at a mask position reads only positions inside the dilated mask).

Equations (eval mode, ``m``, ``d`` binary):

- basic block: ``out = relu(shortcut(x) + m * bn2(conv2(d * relu(bn1(conv1(x))))))``
- inverted residual: ``out = x + m * bn3(conv3(m * act(bn2(conv2(d * act(bn1(conv1(x))))))))``,
  ``act`` = ReLU6.

Outputs are in ``torch.channels_last`` memory format (same values and shape as
the dense-masked block; the layout the gathers work in, so a chain of sparse
blocks hands it on without copies). Inference only: ``forward`` raises in
training mode. The same code runs on CPU and CUDA tensors: no Python loop over
positions or samples; index tables are cached per shape and device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.ops import native
from pipeline.ops.spatial_gate import GatedBasicBlock, GatedInvertedResidual, MaskUnit

STRATEGIES = ("auto", "patches", "tiles")


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


def _window_table(batch: int, in_h: int, in_w: int, grid_h: int, grid_w: int, step: int, start: int,
                  size: int, device: torch.device) -> Tensor:
    """``[batch * grid_h * grid_w + 1, size * size]`` row numbers of square windows in a table whose row 0 is
    zeros and row ``1 + p`` holds flat input position ``p = (b * in_h + y) * in_w + x``.

    Window ``(b, gy, gx)`` covers rows ``gy * step + start + [0, size)`` and the same columns; positions
    outside the image point at row 0 (the zero padding of the convs). The last window is all row 0.
    """
    gy = torch.arange(grid_h, device=device).view(-1, 1, 1, 1) * step + start
    gx = torch.arange(grid_w, device=device).view(1, -1, 1, 1) * step + start
    ly = torch.arange(size, device=device).view(1, 1, -1, 1)
    lx = torch.arange(size, device=device).view(1, 1, 1, -1)
    y, x = gy + ly, gx + lx
    inside = (y >= 0) & (y < in_h) & (x >= 0) & (x < in_w)
    local = torch.where(inside, 1 + y * in_w + x, torch.zeros((), dtype=torch.long, device=device))
    offsets = torch.arange(batch, device=device).view(-1, 1, 1, 1, 1) * (in_h * in_w)
    table = torch.where(inside, local + offsets, local.expand(batch, -1, -1, -1, -1))
    table = table.reshape(batch * grid_h * grid_w, size * size)
    return torch.cat([table, table.new_zeros(1, size * size)])


def _tile_slots(batch: int, h: int, w: int, t: int, device: torch.device) -> Tensor:
    """``[2, batch * h * w]``: the tile of every position (``t`` x ``t`` tiles in row-major order, image after
    image) and the position's offset inside its tile minus ``t * t``."""
    grid_h, grid_w = -(-h // t), -(-w // t)
    y = torch.arange(h, device=device).view(1, -1, 1)
    x = torch.arange(w, device=device).view(1, 1, -1)
    image = torch.arange(batch, device=device).view(-1, 1, 1)
    tile = image * (grid_h * grid_w) + (y // t) * grid_w + x // t
    offset = ((y % t) * t + x % t - t * t).expand(batch, -1, -1)
    return torch.stack([tile.reshape(-1), offset.reshape(-1)])


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


def _with_zero_row(n: int, width: int, like: Tensor) -> Tensor:
    """Uninitialised ``[1 + n, width]`` buffer whose row 0 is zeros."""
    buf = torch.empty(n + 1, width, dtype=like.dtype, device=like.device)
    buf[0].zero_()
    return buf


class _Masks(NamedTuple):
    """What a forward knows about its masks (flat positions index the ``B*H'*W'`` output map)."""

    mask: Tensor  # [B, 1, H', W'], bool (from the mask unit) or 0/1 float (given)
    idx_m: Tensor  # flat mask positions
    window: Tensor | None  # [N_m, 9] 3x3 window rows of the mask positions (as in _window_table)
    dilated: Tensor | None  # [B, 1, H', W'] bool dilated mask
    idx_d: Tensor | None  # flat dilated positions
    flags: Tensor | None  # [1 + B*H'*W'] bool: entry 1 + p is the dilated mask at p, entry 0 is False

    def ranks(self) -> Tensor:
        """``[1 + P]``: the row of position ``p``'s features (entry ``1 + p``) in a table of the dilated
        positions after a zero row; entry 0 (outside the image) is 0, the zero row."""
        return torch.cumsum(self.flags, 0)


def _gate_params(positions: int, conv_w: Tensor, conv_b: Tensor, fc_w: Tensor, fc_b: Tensor) -> tuple[Tensor, ...]:
    """The fast mask unit's parameters: the 9 flipped 3x3 taps ``[9, C]``, minus the linear weight ``[C, 1]``,
    minus both biases ``[1]``; for one image the taps with the linear weight over the positions as a 10th row
    ``[10, C]`` and a ``[10, 1]`` bias that is minus both biases over the positions in row 9."""
    channels = conv_w.shape[1]
    taps = conv_w[0].flip(1, 2).permute(1, 2, 0).reshape(9, channels).contiguous()
    neg_fc = -fc_w.reshape(channels, 1)
    neg_bias = -(conv_b + fc_b).reshape(1)
    rows = torch.cat([taps, neg_fc.t() / positions])
    row_bias = torch.cat([torch.zeros(9, dtype=taps.dtype, device=taps.device), neg_bias / positions]).view(10, 1)
    return taps, neg_fc, neg_bias, rows, row_bias


def _tensor_key(t: Tensor) -> tuple[int, int, int]:
    try:
        version = t._version
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return id(t), t.data_ptr(), version


class _SparseBlock(nn.Module):
    """Shared parts: eval-only guard, the mask unit's decision, mask bookkeeping, index tables, MAC count.

    Settings (plain attributes, change them on an instance):

    - ``strategy``: how the 3x3 conv at the mask positions reads its neighbourhoods: ``"patches"`` (a
      gathered 3x3 neighbourhood per position, then a matrix product or a weighted sum), ``"tiles"``
      (gathered ``tile`` x ``tile`` tiles with a one-pixel halo, then the convolution backend on the tiles)
      or ``"auto"``: patches while the gathered neighbourhoods take at most ``patch_bytes`` (``None``:
      always), tiles above.
    - ``tile``: tile side; ``None``: 4 on maps of at most 16 x 16, else 8.
    - ``dense_above``: active fraction of the mask above which the block runs its folded convs densely
      and multiplies the mask in (the same function; too little left to skip to pay for the gathers);
      > 1 never runs densely. ``None`` (default): the fraction measured on a 2-core CPU
      (benchmarks/bench_sparse_block.py) for the path in use: ``dense_above_default`` for the PyTorch
      path; for the compiled path ``native_dense_above`` at batch > 1 and never at batch 1, where its
      direct convs beat the convolution backend even with every position active.
    - ``fast_gate``: decide the stride-1 mask unit's mask from one batched matrix product plus col2im
      (fold) instead of through its conv modules (the same function, float rounding aside; PyTorch's CPU
      conv with one output channel is slow).
    - ``use_native``: with ``strategy="auto"``, run float32 CPU inputs through the compiled plan
      (``pipeline/ops/native.py``: the same steps, each one loop or GEMM call, gathered 3x3 patches).
    """

    patch_bytes_default: int | None = None
    dense_above_default = 0.2
    native_dense_above = 0.4

    gate: MaskUnit

    def __init__(self) -> None:
        super().__init__()
        self.strategy = "auto"
        self.tile: int | None = None
        self.patch_bytes = self.patch_bytes_default
        self.dense_above: float | None = None
        self.fast_gate = True
        self.use_native = True
        self.dilated_cost = 0
        self.masked_cost = 0
        self.shortcut_cost = 0
        # Plain dicts: nn.Module.__setattr__ is slow enough to show in a small block's forward.
        self._last: dict[str, object] = {}  # mask, dilated, floats, dtype, in_size, path of the last forward
        self._tables: dict[tuple, Tensor] = {}
        self._cache: dict[str, tuple] = {}  # tensors derived from parameters or buffers

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
        # The forward keeps what it computed with (bool from the mask unit, or the given float; no dilation
        # when the block ran densely); the 0/1 floats are made on demand.
        last = self._last
        if not last:
            return None
        if "floats" not in last:
            mask = last["mask"].to(last["dtype"])
            dilated = last["dilated"]
            dilated = F.max_pool2d(mask, 3, 1, 1) if dilated is None else dilated.to(last["dtype"])
            last["floats"] = (mask, dilated)
        return last["floats"]

    @property
    def last_path(self) -> str | None:
        """How the last forward ran: ``"shortcut"`` (no active position), ``"patches"`` or ``"tiles"`` (gather /
        scatter, see ``strategy``) or ``"dense"`` (above ``dense_above``)."""
        return self._last.get("path")

    def _set_masks(self, x: Tensor, mask: Tensor, dilated: Tensor | None, path: str) -> None:
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

    # ------------------------------------------------------------------ mask unit
    def _derived(self, name: str, sources: tuple[Tensor, ...], make: Callable[..., object]):
        """``make(*sources)``, cached until a source is replaced or changed in place."""
        key = tuple(map(_tensor_key, sources))
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                hit = (key, make(*sources))
            self._cache[name] = hit
        return hit[1]

    def _gate_mask(self, x: Tensor) -> Tensor:
        """The mask unit's eval decision ``logits >= 0``, bool ``[B, 1, H', W']``."""
        gate = self._modules["gate"]
        if gate.stride != 1 or not self.fast_gate:
            return gate.logits(x) >= 0
        b, c, h, w = x.shape
        conv, fc = gate._modules["conv"]._parameters, gate._modules["fc"]._parameters
        params = (conv["weight"], conv["bias"], fc["weight"], fc["bias"])
        taps, neg_fc, neg_bias, rows, row_bias = self._derived(f"gate/{h * w}", params, partial(_gate_params, h * w))
        # A matrix product gives every position's 3x3 tap products, summed over each window by col2im
        # (fold, hence the flipped kernel); logits >= 0 <=> that sum >= -(fc(mean(x)) + biases).
        if b == 1:  # one image: one plain product; row 9 summed over the positions is the threshold
            products = torch.addmm(row_bias, rows, x[0].flatten(1))
            return F.fold(products[:9].unsqueeze(0), (h, w), 3, padding=1) >= products[9].sum()
        conv_part = F.fold(torch.matmul(taps, x.flatten(2)), (h, w), 3, padding=1)
        return conv_part >= torch.addmm(neg_bias, x.mean((2, 3)), neg_fc).view(b, 1, 1, 1)

    def _masks(self, x: Tensor, mask: Tensor | None, b: int, h: int, w: int) -> _Masks:
        """The masks at the output resolution ``h`` x ``w``: the mask (from the mask unit, or ``mask``) and its
        flat positions; unless no position is active or the block is to run densely (then ``None``), the
        mask positions' 3x3 windows and the dilated mask."""
        m = self._gate_mask(x) if mask is None else mask
        idx_m = m.view(-1).nonzero().view(-1)
        dense_above = self.dense_above_default if self.dense_above is None else self.dense_above
        if idx_m.numel() == 0 or idx_m.numel() > dense_above * m.numel():
            # The dilation of an empty or full mask is the mask; else made from the mask when asked for.
            empty = idx_m.numel() == 0
            self._set_masks(x, m, m if empty or idx_m.numel() == m.numel() else None, "shortcut" if empty else "dense")
            return _Masks(m, idx_m, None, None, None, None)
        window = self._table("window", b, h, w, h, w, 1, -1, 3, x.device).index_select(0, idx_m)
        # The dilation is the union of the mask positions' 3x3 windows (cheaper than a max-pool here).
        flags = torch.zeros(1 + m.numel(), dtype=torch.bool, device=m.device)
        flags.index_fill_(0, window.view(-1), True)
        flags[0] = False  # where windows leave the image
        d = flags[1:].view(m.shape)
        self._set_masks(x, m, d, "patches")
        return _Masks(m, idx_m, window, d, d.view(-1).nonzero().view(-1), flags)

    # ------------------------------------------------------------------ index tables
    def _table(self, *key: object) -> Tensor:
        table = self._tables.get(key)
        if table is None:
            # Normal tensors even when built under inference_mode, so any later forward may use them.
            with torch.inference_mode(False):
                table = _tile_slots(*key[1:]) if key[0] == "slots" else _window_table(*key[1:])
            if len(self._tables) >= 64:
                self._tables.clear()
            self._tables[key] = table
        return table

    def _use_tiles(self, positions: int, width: int, itemsize: int) -> bool:
        if self.strategy == "auto":
            return self.patch_bytes is not None and positions * 9 * width * itemsize > self.patch_bytes
        return self.strategy == "tiles"

    def _conv_on_tiles(self, features: Tensor, ranks: Tensor, idx_m: Tensor, weight: Tensor, bias: Tensor,
                       groups: int, b: int, h: int, w: int) -> Tensor:
        """A 3x3 conv (padding 1) at the mask positions, run on the active ``t`` x ``t`` tiles (any mask
        position inside) with a one-pixel halo gathered from ``features`` (rows of the dilated positions after
        a zero row); returns ``[N_m, C_out]`` rows in the order of ``idx_m``."""
        t = self.tile or (4 if h * w <= 256 else 8)
        grid_h, grid_w = -(-h // t), -(-w // t)
        slots = self._table("slots", b, h, w, t, idx_m.device).index_select(1, idx_m)  # tile, offset - t*t
        flags = torch.zeros(b * grid_h * grid_w, dtype=torch.long, device=idx_m.device)
        flags.index_fill_(0, slots[0], 1)
        tiles = flags.nonzero().view(-1)
        window = self._table("window", b, h, w, grid_h, grid_w, t, -1, t + 2, idx_m.device)
        if tiles.numel() % 8:
            # Few distinct shapes, so the conv backend's per-shape plans are reused; extra tiles read zeros.
            tiles = F.pad(tiles, (0, -tiles.numel() % 8), value=window.shape[0] - 1)
        rows = ranks.index_select(0, window.index_select(0, tiles).view(-1))
        gathered = features.index_select(0, rows).view(tiles.numel(), t + 2, t + 2, features.shape[1])
        conv = F.conv2d(gathered.permute(0, 3, 1, 2), weight, bias, groups=groups)
        tile_rank = torch.cumsum(flags, 0)  # 1-based rank of each active tile
        keep = torch.add(slots[1], tile_rank.index_select(0, slots[0]), alpha=t * t)
        return conv.permute(0, 2, 3, 1).reshape(-1, conv.shape[1]).index_select(0, keep)

    # ------------------------------------------------------------------ entry points
    def forward(self, x: Tensor) -> Tensor:
        """Eval-mode block output with the mask unit's own mask (``logits >= 0``)."""
        self._require_eval()
        self._check(x)
        if self.use_native and self.strategy == "auto" and native.usable(x):
            return self._run_native(x, None)
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._run(x, None)
        return self._run(x, None)

    def forward_with_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """Eval-mode block output with an explicit 0/1 mask ``[B, 1, H', W']`` at the output resolution (the
        mask unit does not run); nonzero entries are active."""
        self._require_eval()
        self._check(x)
        expected = (x.shape[0], 1, *self._out_size(x))
        if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
            raise ValueError(f"{type(self).__name__}: mask must have shape {expected}, "
                             f"got {getattr(mask, 'shape', type(mask).__name__)}")
        if mask.device != x.device:
            raise ValueError(f"{type(self).__name__}: mask is on {mask.device}, the input on {x.device}")
        if self.use_native and self.strategy == "auto" and native.usable(x):
            return self._run_native(x, mask)
        with torch.no_grad():
            return self._run(x, (mask != 0).to(x.dtype))

    def _run_native(self, x: Tensor, mask: Tensor | None) -> Tensor:
        gate = self._modules["gate"]
        conv, fc = gate._modules["conv"]._parameters, gate._modules["fc"]._parameters
        sources = (conv["weight"], conv["bias"], fc["weight"], fc["bias"],
                   *(t for t in self._buffers.values() if t is not None))
        plan = self._derived("native", sources, self._native_plan)
        dense_above = self.dense_above
        if dense_above is None:
            dense_above = 2.0 if x.shape[0] == 1 else self.native_dense_above
        out, m, dilated, path = plan.forward(x, mask, float(dense_above))
        self._set_masks(x, m, dilated, native.PATHS[path])
        return out

    def _native_plan(self, *sources: Tensor) -> object:
        raise NotImplementedError

    def _require_eval(self) -> None:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} is for inference only: call .eval() first "
                               "(train the gated block it was made from instead)")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1):
            raise ValueError(f"tile must be a positive integer or None, got {self.tile!r}")
        if self.dense_above is not None and (isinstance(self.dense_above, bool)
                                             or not isinstance(self.dense_above, (int, float))):
            raise ValueError(f"dense_above must be a number or None, got {self.dense_above!r}")

    def _check(self, x: Tensor) -> None:
        raise NotImplementedError

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        raise NotImplementedError

    def _run(self, x: Tensor, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.update(_last={}, _tables={}, _cache={})
        return state

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, tile={self.tile}, dense_above={self.dense_above}"


class SparseInvertedResidual(_SparseBlock):
    """Gather / scatter inference of a ``GatedInvertedResidual`` (Verelst & Tuytelaars, CVPR 2020).

    ``out = x + m * bn3(conv3(m * act(bn2(conv2(d * act(bn1(conv1(x))))))))``, act = ReLU6: the 1x1
    expansion runs at the dilated positions ``d``, the depthwise 3x3 (reading its neighbourhood from those
    features, zero elsewhere) and the 1x1 projection at the mask positions ``m``; the result is added into
    the identity shortcut. Buffers ``w1, b1, w2, b2, w3, b3`` are the BN-folded conv weights and biases.
    """

    patch_bytes_default = 1 << 20
    dense_above_default = 0.3
    native_dense_above = 0.6

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
        if not isinstance(block, GatedInvertedResidual):
            raise ValueError(f"from_gated expects a GatedInvertedResidual, got {type(block).__name__}")
        if block.training:
            raise ValueError("from_gated needs an eval-mode block (BN running statistics are folded): call .eval()")
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
        """The block in the compiled whole-model plan (``pipeline/ops/plan``), on rows: mask unit, the 1x1
        expansion + ReLU6 at the dilated mask's positions, the depthwise 3x3 + ReLU6 and the 1x1 projection
        (added to the input) at the mask's, the input passing alone elsewhere (the official MobileNetV2 code's
        masks)."""
        p = self._buffers
        x = b.as_rows(x)
        gate = self.gate.plan_into(b, f"{name}.gate", x, 1)
        b.watch(*p.values())
        t = b.rows_conv(x, p["w1"], p["b1"], 1, b.ACT_RELU6, gate=gate, which=0)
        t = b.rows_depthwise(t, p["w2"], p["b2"], b.ACT_RELU6, gate=gate, which=1)
        return b.rows_conv(t, p["w3"], p["b3"], 1, b.ACT_NONE, res=x, gate=gate, which=1)

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.in_channels, type(self).__name__)

    def _native_plan(self, *sources: Tensor) -> object:
        p = self._buffers
        return native.load().InvertedResidualPlan(*sources[:4], p["w1"], p["b1"], p["w2"], p["b2"], p["w3"], p["b3"])

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        return x.shape[2], x.shape[3]

    def _run(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        p = self._buffers
        hid = self.hidden
        masks = self._masks(x, mask, b, h, w)
        idx_m, idx_d = masks.idx_m, masks.idx_d
        if idx_d is None:
            if idx_m.numel() == 0:
                return x.clone(memory_format=torch.channels_last)
            return self._dense(x, masks.mask, idx_m.numel() == b * h * w)
        # The shortcut as channels-last rows [B*H*W, C], a copy of x (scatter-added into below).
        out = x.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).view(-1, c)
        expanded = _with_zero_row(idx_d.numel(), hid, out)  # zero row: what conv2 reads outside d
        torch.addmm(p["b1"], out.index_select(0, idx_d), p["w1"].view(hid, c).t(), out=expanded[1:])
        expanded.clamp_(0.0, 6.0)
        ranks = masks.ranks()
        if self._use_tiles(idx_m.numel(), hid, x.element_size()):
            self._last["path"] = "tiles"
            hidden = self._conv_on_tiles(expanded, ranks, idx_m, p["w2"], p["b2"], hid, b, h, w)
        else:
            taps = expanded.index_select(0, ranks.index_select(0, masks.window.view(-1))).view(-1, 9, hid)
            hidden = taps.mul_(self._derived("taps", (p["w2"],), lambda t: t.view(hid, 9).t().contiguous()))
            hidden = hidden.sum(1).add_(p["b2"])
        hidden = hidden.clamp_(0.0, 6.0)
        out.index_add_(0, idx_m, torch.addmm(p["b3"], hidden, p["w3"].view(c, hid).t()))
        return _as_nchw(out, b, h, w)

    def _dense(self, x: Tensor, m: Tensor, all_active: bool) -> Tensor:
        """The dense-masked computation with the folded convs, for masks with little to skip. The masks inside
        the branch can go: the depthwise conv at a position of m reads only positions of d, and the 1x1
        projection is pointwise, so ``x + m * branch(x)`` is the same function."""
        p = self._buffers
        x = x.contiguous(memory_format=torch.channels_last)
        e = F.conv2d(x, p["w1"], p["b1"]).clamp_(0.0, 6.0)
        e = F.conv2d(e, p["w2"], p["b2"], padding=1, groups=self.hidden).clamp_(0.0, 6.0)
        r = F.conv2d(e, p["w3"], p["b3"])
        return r.add_(x) if all_active else torch.addcmul(x, r, m)


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
    def from_gated(cls, block: GatedBasicBlock) -> SparseBasicBlock:
        """Sparse copy of an eval-mode gated block: BNs folded once, the mask unit copied as is."""
        if not isinstance(block, GatedBasicBlock):
            raise ValueError(f"from_gated expects a GatedBasicBlock, got {type(block).__name__}")
        if block.training:
            raise ValueError("from_gated needs an eval-mode block (BN running statistics are folded): call .eval()")
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
        ws = bs = None
        if not isinstance(block.shortcut, nn.Identity):
            conv, bn = block.shortcut[0], block.shortcut[1]
            if conv.kernel_size != (1, 1) or conv.stride != (stride, stride) or conv.padding != (0, 0):
                raise ValueError("the projection shortcut must be a 1x1 conv with the block's stride")
            ws, bs = _fold_bn(conv.weight, bn, conv.bias)
        elif stride != 1 or block.conv1.in_channels != block.conv1.out_channels:
            raise ValueError("an identity shortcut needs stride 1 and equal widths")
        sparse = cls(copy.deepcopy(block.gate), stride, w1, b1, w2, b2, ws, bs)
        sparse._copy_costs(block)
        return sparse.eval()

    plan_reads_rows = True  # in the whole-model plan its input is rows: the op before may write them directly

    def plan_into(self, b, name: str, x: int) -> int:
        """The block in the compiled whole-model plan (``pipeline/ops/plan``), on rows (position-major): mask
        unit, shortcut at every position, conv1 at the dilated mask's positions, conv2 at the mask's (added to
        the shortcut, which passes alone elsewhere), ReLU after the sum."""
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

    def _native_plan(self, *sources: Tensor) -> object:
        p = self._buffers
        return native.load().BasicBlockPlan(*sources[:4], self.stride, p["w1"], p["b1"], p["w2"], p["b2"],
                                            p["ws"], p["bs"])

    def _out_size(self, x: Tensor) -> tuple[int, int]:
        s = self.stride
        return (x.shape[2] - 1) // s + 1, (x.shape[3] - 1) // s + 1

    @staticmethod
    def _matrix(weight: Tensor) -> Tensor:
        """``[C_out, C_in, 3, 3]`` kernel as the ``[9 * C_in, C_out]`` matrix of (ky, kx, c_in) rows (a view for
        a channels_last kernel)."""
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).t()

    def _shortcut_rows(self, rows: Tensor, b: int, h: int, w: int) -> Tensor:
        """Projection shortcut ``[B*H'*W', C_out]`` of the channels-last input rows (folded 1x1 conv, stride s)."""
        p, s = self._buffers, self.stride
        strided = rows.view(b, h, w, -1)[:, ::s, ::s].reshape(-1, rows.shape[1])
        return torch.addmm(p["bs"], strided, p["ws"].view(self.out_channels, -1).t())

    def _run(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, c, h, w = x.shape
        ho, wo = self._out_size(x)
        s, co = self.stride, self.out_channels
        p = self._buffers
        masks = self._masks(x, mask, b, ho, wo)
        idx_m, idx_d = masks.idx_m, masks.idx_d
        if idx_d is not None or idx_m.numel() == 0:
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels_last input, else a copy
        if idx_d is None:
            if idx_m.numel():
                return self._dense(x, masks.mask, idx_m.numel() == b * ho * wo)
            out = rows.clone() if p["ws"] is None else self._shortcut_rows(rows, b, h, w)
            return _as_nchw(out.relu_(), b, ho, wo)
        source = torch.cat([rows.new_zeros(1, c), rows])  # row 0: what the conv padding reads
        # Identity shortcut: the input rows in source, scatter-added into only after the last gather.
        out = source[1:] if p["ws"] is None else self._shortcut_rows(rows, b, h, w)
        window_in = self._table("window", b, h, w, ho, wo, s, -1, 3, x.device)
        cols = source.index_select(0, window_in.index_select(0, idx_d).view(-1)).view(-1, 9 * c)
        hidden = _with_zero_row(idx_d.numel(), co, x)  # zero row: what conv2 reads outside d
        torch.addmm(p["b1"], cols, self._matrix(p["w1"]), out=hidden[1:])
        hidden.relu_()
        ranks = masks.ranks()
        if self._use_tiles(idx_m.numel(), co, x.element_size()):
            self._last["path"] = "tiles"
            r = self._conv_on_tiles(hidden, ranks, idx_m, p["w2"], p["b2"], 1, b, ho, wo)
        else:
            cols = hidden.index_select(0, ranks.index_select(0, masks.window.view(-1))).view(-1, 9 * co)
            r = torch.addmm(p["b2"], cols, self._matrix(p["w2"]))
        out.index_add_(0, idx_m, r)
        return _as_nchw(out.relu_(), b, ho, wo)

    def _dense(self, x: Tensor, m: Tensor, all_active: bool) -> Tensor:
        """The dense-masked computation with the folded convs, for masks with little to skip. conv2 at a
        position of m reads conv1 only at positions of d, so ``relu(shortcut(x) + m * branch(x))`` is the
        same function."""
        p = self._buffers
        x = x.contiguous(memory_format=torch.channels_last)
        h1 = F.conv2d(x, p["w1"], p["b1"], stride=self.stride, padding=1).relu_()
        r = F.conv2d(h1, p["w2"], p["b2"], padding=1)
        shortcut = x if p["ws"] is None else F.conv2d(x, p["ws"], p["bs"], stride=self.stride)
        return (r.add_(shortcut) if all_active else torch.addcmul(shortcut, r, m)).relu_()


def to_sparse_execution(model: nn.Module) -> nn.Module:
    """Deep copy of an eval-mode ``model`` with every ``GatedBasicBlock`` / ``GatedInvertedResidual``
    replaced by its gather / scatter counterpart under the same module name (DynConv, Verelst &
    Tuytelaars, CVPR 2020), for inference."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_sparse_execution expects an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("to_sparse_execution needs an eval-mode model (BN statistics are folded): call .eval()")
    sparse = copy.deepcopy(model)
    for name, module in list(sparse.named_modules()):
        if isinstance(module, GatedBasicBlock):
            new: nn.Module = SparseBasicBlock.from_gated(module)
        elif isinstance(module, GatedInvertedResidual):
            new = SparseInvertedResidual.from_gated(module)
        else:
            continue
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(sparse.get_submodule(parent) if parent else sparse, child, new)
    return sparse.eval()
