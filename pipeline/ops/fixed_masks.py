"""Mask units that do not learn: the controls of DynConv's learned gates.

A DynConv-gated block (:mod:`pipeline.ops.spatial_gate`) with one of these in
place of its ``MaskUnit`` executes the same fraction of its positions, chosen
without looking at the input:

- :class:`RandomMask`: every position of every image independently with
  probability ``density`` (drawn from torch's global generator, so the
  training engine's seeding makes it reproducible), in training and at eval;
- :class:`UniformMask`: a fixed ordered-dither pattern (the 8 x 8 Bayer
  matrix thresholded at ``density``): spread evenly over the map, the same
  for every image.

Neither costs MACs (no mask unit runs). :func:`density_for_fraction` finds the
density at which a block executes a given fraction of its cost (the dilated
mask runs the first conv, the mask the rest).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.ops.spatial_gate import expand_mask

# Bayer's 8 x 8 ordered-dither matrix: thresholding it at d marks a fraction d of the cells, evenly spread.
_BAYER2 = torch.tensor([[0, 2], [3, 1]], dtype=torch.float64)


def bayer(n: int = 8) -> Tensor:
    m = _BAYER2
    while m.shape[0] < n:
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    return (m + 0.5) / m.numel()


def dither(h: int, w: int, density: float | Tensor) -> Tensor:
    """The ``h`` x ``w`` ordered-dither pattern (bool) marking a fraction ``density`` of the positions."""
    return bayer().repeat(math.ceil(h / 8), math.ceil(w / 8))[:h, :w] < density


class _FixedMask(nn.Module):
    """Shared parts: the block's stride and output size, ``density`` as a buffer, no MACs."""

    def __init__(self, in_channels: int, stride: int = 1, density: float = 1.0):
        super().__init__()
        self.in_channels, self.stride = in_channels, stride
        self.register_buffer("density", torch.tensor(float(density), dtype=torch.float64))
        self.temperature, self.noise = 1.0, False  # what set_gumbel sets on mask units; unused

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (height - 1) // self.stride + 1, (width - 1) // self.stride + 1

    def macs(self, in_shape: tuple[int, int, int]) -> int:
        return 0


class RandomMask(_FixedMask):
    """Each position executes independently with probability ``density``."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.output_size(*x.shape[-2:])
        return (torch.rand(x.shape[0], 1, h, w, device=x.device) < self.density).to(x.dtype)


class UniformMask(_FixedMask):
    """A fixed ordered-dither pattern of density ``density``, the same for every image."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.output_size(*x.shape[-2:])
        return dither(h, w, self.density).to(device=x.device, dtype=x.dtype).expand(x.shape[0], 1, h, w)


def expected_fraction(kind: str, density: float, h: int, w: int, dilated_cost: int, masked_cost: int,
                      stride: int = 1, in_size: tuple[int, int] | None = None) -> float:
    """The executed fraction of a block's cost at ``density``: (|dilate(m)| dilated_cost + |m| masked_cost) /
    (positions (dilated_cost + masked_cost)); expected over random masks, exact for the pattern. With
    ``in_size`` the first conv runs on the input grid of a block of ``stride`` (a torchvision bottleneck:
    ``expand_mask``), and the positions of each grid count for their own cost."""
    if in_size is not None:
        return _expected_fraction_on_input_grid(kind, density, h, w, dilated_cost, masked_cost, stride, in_size)
    if kind == "uniform":
        m = dither(h, w, density).double()
        d = torch.nn.functional.max_pool2d(m[None, None], 3, 1, 1)[0, 0]
        mask, dilated = m.mean().item(), d.mean().item()
    else:  # a position is in the dilated mask unless its whole (clipped) 3 x 3 neighbourhood is off
        rows = torch.tensor([min(i + 1, h - 1) - max(i - 1, 0) + 1 for i in range(h)], dtype=torch.float64)
        cols = torch.tensor([min(j + 1, w - 1) - max(j - 1, 0) + 1 for j in range(w)], dtype=torch.float64)
        neighbours = rows[:, None] * cols[None, :]
        mask, dilated = density, (1 - (1 - density) ** neighbours).mean().item()
    return (dilated * dilated_cost + mask * masked_cost) / (dilated_cost + masked_cost)


def _expected_fraction_on_input_grid(kind: str, density: float, h: int, w: int, dilated_cost: int, masked_cost: int,
                                     stride: int, in_size: tuple[int, int]) -> float:
    ih, iw = in_size
    if kind == "uniform":
        m = dither(h, w, density).double()
        mask = m.sum().item()
        dilated = expand_mask(m[None, None], stride, in_size).sum().item()
    else:  # an input position is read unless every output whose strided 3 x 3 window holds it is off
        rows = torch.tensor([sum(abs(stride * i - y) <= 1 for i in range(h)) for y in range(ih)], dtype=torch.float64)
        cols = torch.tensor([sum(abs(stride * j - x) <= 1 for j in range(w)) for x in range(iw)], dtype=torch.float64)
        mask, dilated = density * h * w, (1 - (1 - density) ** (rows[:, None] * cols[None, :])).sum().item()
    return (dilated * dilated_cost + mask * masked_cost) / (ih * iw * dilated_cost + h * w * masked_cost)


def density_for_fraction(kind: str, fraction: float, h: int, w: int, dilated_cost: int, masked_cost: int,
                         stride: int = 1, in_size: tuple[int, int] | None = None) -> float:
    """The density (bisection, the fraction grows with it) at which the block executes ``fraction`` of its cost;
    the closest reachable one when the dilation makes ``fraction`` unreachable."""
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if expected_fraction(kind, mid, h, w, dilated_cost, masked_cost, stride, in_size) < fraction:
            lo = mid
        else:
            hi = mid
    return hi
