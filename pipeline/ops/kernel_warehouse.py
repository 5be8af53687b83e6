"""KernelWarehouse convolution (Li & Yao, "KernelWarehouse: Rethinking the Design of Dynamic Convolution",
ICML 2024; official code OSVAI/KernelWarehouse).

Kernel partition: the static kernel ``W`` [C_out, C_in, k, k] of a layer is cut into ``m`` disjoint cells
``w_1 .. w_m`` of one shape [c_o, c_i, 1, 1] (spatial partition: one cell per kernel position, output-channel
block and input-channel block). Warehouse sharing: every cell of every layer that shares a
:class:`Warehouse` is a linear mixture of the same ``n`` cells ``e_1 .. e_n``,

    w_i(x) = alpha_i1(x) e_1 + ... + alpha_in(x) e_n,

and the layer assembles its kernel from its ``m`` mixtures in order. The attention (the paper's
contrasting-driven attention function) is GAP -> linear -> BN -> ReLU -> linear to ``m x (n + 1)`` values
``z`` (the last one per mixture is a "zero cell"), normalised per mixture by the sum of absolute values, so
attentions can be negative, and blended with a fixed binary assignment ``gamma`` (each mixture its own cell)
by a temperature ``tau`` annealed from 1 to 0:

    alpha = (1 - tau) z / (sum_j |z_j| + 1e-3) + tau gamma      (the zero cell's column dropped).

The warehouse size ``n`` is the parameter budget: ``budget`` x the number of cells of the layers sharing it
(1/4 x to 4 x in the paper). :meth:`KWConv2d.forward_reference` computes every sample's kernel cell by cell
with explicit sums, the slow reference the batched :meth:`KWConv2d.forward` is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.ops.dynamic_conv import ConvShape, check_input, conv_geometry

EPS = 1e-3  # of the attention's normalisation, as in the paper's code


class Warehouse(nn.Module):
    """``n`` kernel cells [n, c_o, c_i] shared by the layers that mix their kernels from it."""

    def __init__(self, num_cells: int, cell_out: int, cell_in: int):
        super().__init__()
        if min(num_cells, cell_out, cell_in) < 1:
            raise ValueError(f"a warehouse needs >= 1 cell of >= 1 x 1 channels, got {num_cells} x "
                             f"[{cell_out}, {cell_in}]")
        self.cells = nn.Parameter(torch.zeros(num_cells, cell_out, cell_in))

    @property
    def num_cells(self) -> int:
        return self.cells.shape[0]

    def extra_repr(self) -> str:
        return f"{self.num_cells} cells of [{self.cells.shape[1]}, {self.cells.shape[2]}]"


def assignment(first: int, count: int, budget: float, num_cells: int) -> list[int]:
    """The warehouse cell each of ``count`` mixtures (global indices ``first ..``) starts on at ``tau = 1``;
    ``num_cells`` stands for the zero cell. With ``budget >= 1`` mixture ``g`` takes cell ``floor(g * budget)``
    (every mixture its own); below 1 the first mixture that reaches a cell takes it and the others the zero
    cell."""
    out = []
    for g in range(first, first + count):
        cell = math.floor(g * budget)
        fresh = g == 0 or cell != math.floor((g - 1) * budget)
        out.append(min(cell, num_cells - 1) if budget >= 1 or fresh else num_cells)
    return out


class KWConv2d(ConvShape, nn.Module):
    """A conv whose kernel is assembled per sample from cells of a shared :class:`Warehouse` (module doc)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, warehouse: Warehouse, assigned: list[int],
                 reduction: float = 0.0625, min_hidden: int = 16, temperature: float = 1.0):
        super().__init__()
        if groups != 1:
            raise ValueError("KWConv2d mixes ungrouped convs only (groups=1)")
        self.in_channels, self.out_channels = in_channels, out_channels
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        _, co, ci = warehouse.cells.shape
        if out_channels % co or in_channels % ci:
            raise ValueError(f"warehouse cells [{co}, {ci}] do not tile a [{out_channels}, {in_channels}] kernel")
        self.blocks = (out_channels // co, in_channels // ci)
        self.num_mixtures = self.kernel_size[0] * self.kernel_size[1] * self.blocks[0] * self.blocks[1]
        if len(assigned) != self.num_mixtures:
            raise ValueError(f"{len(assigned)} assigned cells for {self.num_mixtures} mixtures")
        self.warehouse = warehouse
        n = warehouse.num_cells
        self.hidden = max(int(in_channels * reduction), min_hidden)
        self.fc1 = nn.Linear(in_channels, self.hidden, bias=False)
        self.norm = nn.BatchNorm1d(self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.num_mixtures * (n + 1))
        gamma = torch.zeros(self.num_mixtures, n + 1)
        gamma[torch.arange(self.num_mixtures), torch.tensor(assigned)] = 1.0
        self.register_buffer("gamma", gamma)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("out_scale", None)  # a folded BatchNorm's scale (fold_batchnorm)
        self.temperature = float(temperature)
        nn.init.kaiming_normal_(self.fc1.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.fc2.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc2.bias)

    def set_temperature(self, tau: float) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"the temperature of KernelWarehouse's attention lies in [0, 1], got {tau!r}")
        self.temperature = float(tau)

    # ------------------------------------------------------------------ attention
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """alpha [B, m, n] (module doc)."""
        z = self.fc2(F.relu(self.norm(self.fc1(x.mean((2, 3))))))
        z = z.view(x.shape[0], self.num_mixtures, -1)
        z = z / (z.abs().sum(-1, keepdim=True) + EPS)
        alpha = (1.0 - self.temperature) * z + self.temperature * self.gamma
        return alpha[..., :-1]

    def assemble(self, mixed: torch.Tensor) -> torch.Tensor:
        """Kernels [B, C_out, C_in, k, k] from the mixed cells [B, m, c_o, c_i], mixture index
        ``((ky * k + kx) * blocks_out + o) * blocks_in + i``."""
        b = mixed.shape[0]
        kh, kw = self.kernel_size
        bo, bi = self.blocks
        co, ci = mixed.shape[-2:]
        k = mixed.view(b, kh, kw, bo, bi, co, ci).permute(0, 3, 5, 4, 6, 1, 2)
        return k.reshape(b, self.out_channels, self.in_channels, kh, kw)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.attention(x)
        cells = self.warehouse.cells
        mixed = (alpha.reshape(-1, cells.shape[0]) @ cells.reshape(cells.shape[0], -1))
        return self.assemble(mixed.view(x.shape[0], self.num_mixtures, *cells.shape[1:]))

    # ------------------------------------------------------------------ forward
    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_scale is not None:
            y = y * self.out_scale.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b = x.shape[0]
        weight = self.kernels(x).reshape(b * self.out_channels, self.in_channels, *self.kernel_size)
        y = F.conv2d(x.reshape(1, b * self.in_channels, *x.shape[2:]), weight, None, self.stride, self.padding,
                     self.dilation, groups=b)
        return self._finish(y.view(b, self.out_channels, *y.shape[2:]))

    @torch.no_grad()
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same function sample by sample, each kernel cell summed over the warehouse one term at a time
        and placed by explicit indices."""
        check_input(x, self.in_channels)
        alpha = self.attention(x)
        cells = self.warehouse.cells
        co, ci = cells.shape[1:]
        kh, kw = self.kernel_size
        bo, bi = self.blocks
        out = []
        for s in range(x.shape[0]):
            kernel = torch.zeros(self.out_channels, self.in_channels, kh, kw, dtype=x.dtype)
            index = 0
            for ky in range(kh):
                for kx in range(kw):
                    for o in range(bo):
                        for i in range(bi):
                            cell = torch.zeros(co, ci, dtype=x.dtype)
                            for j in range(cells.shape[0]):
                                cell += alpha[s, index, j] * cells[j]
                            kernel[o * co:(o + 1) * co, i * ci:(i + 1) * ci, ky, kx] = cell
                            index += 1
            out.append(F.conv2d(x[s:s + 1], kernel, None, self.stride, self.padding, self.dilation))
        return self._finish(torch.cat(out))

    # ------------------------------------------------------------------ conversion
    @torch.no_grad()
    def load_dense(self, conv: nn.Conv2d) -> None:
        """Write ``conv``'s kernel into the cells this layer is assigned (``gamma``): at ``tau = 1`` with a
        budget >= 1 the layer then computes ``conv`` exactly. Cells shared by several mixtures (budget < 1)
        keep the first one's values. The attention starts at the assignment too (its last linear layer's
        weight 0, its bias ``gamma``), so the layer computes ``conv`` at any temperature (scaled by
        1 / (1 + EPS) at 0) until fine-tuning moves it: a pretrained network converted with a random
        attention loses its function once the temperature reaches 0."""
        kernel = conv.weight.detach()
        if tuple(kernel.shape) != (self.out_channels, self.in_channels, *self.kernel_size):
            raise ValueError(f"conv weight {list(kernel.shape)} does not match this layer")
        cells = self.warehouse.cells
        co, ci = cells.shape[1:]
        kh, kw = self.kernel_size
        bo, bi = self.blocks
        split = kernel.reshape(bo, co, bi, ci, kh, kw).permute(4, 5, 0, 2, 1, 3).reshape(-1, co, ci)
        for index, cell in enumerate(self.gamma.argmax(1).tolist()):
            if cell < cells.shape[0]:
                cells[cell] = split[index]
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().clone())
        self.fc2.weight.zero_()
        self.fc2.bias.copy_(self.gamma.flatten())

    # ------------------------------------------------------------------ what the library asks of operators
    def macs(self, input_shape: tuple[int, int, int]) -> dict[str, int]:
        """Multiply-accumulates per image of shape (C, H, W): the conv, the assembly of the kernel from the
        warehouse (m x n cell mixtures) and the attention branch."""
        _, h, w = input_shape
        h_out, w_out = self.output_hw(h, w)
        conv = h_out * w_out * self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        cells = self.warehouse.cells
        assembly = self.num_mixtures * cells.shape[0] * cells.shape[1] * cells.shape[2]
        branch = self.in_channels * self.hidden + self.hidden * self.fc2.out_features
        return {"conv": conv, "assembly": assembly, "attention": branch, "total": conv + assembly + branch}

    def counted_macs(self, x: torch.Tensor) -> int:
        """MACs of a forward on ``x`` (the whole batch), for the MAC counter (``pipeline/complexity.py``)."""
        return int(self.macs(tuple(x.shape[1:]))["total"]) * x.shape[0]

    @torch.no_grad()
    def fold_batchnorm(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        """Fold an eval-mode BatchNorm after this conv into a per-channel output scale and bias (exact; the
        shared cells cannot take one layer's scale)."""
        old = self.out_scale if self.out_scale is not None else torch.ones(self.out_channels)
        self.out_scale = old * scale
        bias = self.bias if self.bias is not None else torch.zeros(self.out_channels)
        self.bias = nn.Parameter(bias * scale + shift)
        return True

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, mixtures={self.num_mixtures}, temperature={self.temperature:g}")


def cells_of(conv: nn.Conv2d, cell_out: int, cell_in: int) -> int:
    """How many [cell_out, cell_in] 1 x 1 cells tile ``conv``'s kernel (the mixtures of its KWConv2d)."""
    return conv.kernel_size[0] * conv.kernel_size[1] * (conv.out_channels // cell_out) * (conv.in_channels // cell_in)


def plan_warehouses(convs: list[tuple[str, nn.Conv2d]], group_of, budget: float) -> dict[str, tuple[int, int, int]]:
    """Per warehouse (``group_of(name)``): (cells, cell C_out, cell C_in) for the convs that share it: cell
    channels the gcd of their channels, ``budget`` x their cells in all (at least 1)."""
    groups: dict[str, list[nn.Conv2d]] = {}
    for name, conv in convs:
        groups.setdefault(group_of(name), []).append(conv)
    out = {}
    for key, members in groups.items():
        co = math.gcd(*[c.out_channels for c in members])
        ci = math.gcd(*[c.in_channels for c in members])
        total = sum(cells_of(c, co, ci) for c in members)
        out[key] = (max(1, int(total * budget)), co, ci)
    return out


def convert_convs(model: nn.Module, convs: list[tuple[str, nn.Conv2d]], group_of, budget: float, *,
                  reduction: float, min_hidden: int, noise_std: float, generator: torch.Generator,
                  replace) -> dict[str, Warehouse]:
    """Replace every conv of ``convs`` (name, module) by a :class:`KWConv2d` on the warehouse of its group,
    starting from the conv's kernel (``noise_std`` x the group's weight std of Gaussian noise on the cells).
    ``replace(model, name, module)`` puts a module in place. Returns the warehouses by group."""
    for name, conv in convs:
        if conv.groups != 1:
            raise ValueError(f"{name}: KernelWarehouse mixes ungrouped convs only (groups={conv.groups})")
    plan = plan_warehouses(convs, group_of, budget)
    warehouses = {key: Warehouse(*shape) for key, shape in plan.items()}
    used = {key: 0 for key in plan}
    stds: dict[str, list[torch.Tensor]] = {}
    for name, conv in convs:
        key = group_of(name)
        wh = warehouses[key]
        geometry = conv_geometry(conv)
        layer_cells = cells_of(conv, *wh.cells.shape[1:])
        assigned = assignment(used[key], layer_cells, budget, wh.num_cells)
        used[key] += layer_cells
        layer = KWConv2d(**geometry, warehouse=wh, assigned=assigned, reduction=reduction, min_hidden=min_hidden)
        layer.load_dense(conv)
        stds.setdefault(key, []).append(conv.weight.detach().flatten())
        replace(model, name, layer)
    if noise_std > 0:
        with torch.no_grad():
            for key, wh in warehouses.items():
                std = torch.cat(stds[key]).std(correction=0)
                wh.cells.add_(torch.randn(wh.cells.shape, generator=generator) * (noise_std * std))
    return warehouses
