"""Embedded default data: "cluttered digits" rendered from scikit-learn's bundled
handwritten digits (``load_digits``: 1,797 real 8x8 scans, 10 classes).

Nothing is downloaded. The SOURCE digits are first split into disjoint
train/val/test pools (stratified by class, seeded); every rendered image of a
split is drawn only from that split's pool, both the digit and its clutter, so
no handwriting crosses splits.

One image: a dark canvas, the digit upscaled (bilinear) to a random size,
optionally rotated, scaled in contrast and placed at a random position, plus
clutter fragments (random crops of OTHER digits of the same pool, upscaled by
the same factor) and Gaussian pixel noise. The digit covers a minority of the
canvas (14-25 % of a 32x32 canvas by default): that spatial sparsity is what
DynConv's gated blocks exploit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config import DigitPools, DigitStyle, Renders

SOURCE = "scikit-learn load_digits (1,797 handwritten 8x8 digits, UCI optdigits test set)"


@dataclass(frozen=True)
class SourceDigits:
    images: np.ndarray  # [N, 8, 8] float32 in [0, 1]
    labels: np.ndarray  # [N] int64


def load_source() -> SourceDigits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return SourceDigits(
        images=(bunch.images / 16.0).astype(np.float32),
        labels=bunch.target.astype(np.int64),
    )


def split_pools(labels: np.ndarray, pools: DigitPools, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded split of source indices into disjoint train/val/test pools."""
    rng = np.random.default_rng([seed, 0])
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(pools.val * len(idx)))
        n_test = int(round(pools.test * len(idx)))
        out["val"].extend(idx[:n_val])
        out["test"].extend(idx[n_val : n_val + n_test])
        out["train"].extend(idx[n_val + n_test :])
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _resize(img: np.ndarray, size: int, angle: float = 0.0) -> np.ndarray:
    pil = Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    if angle:
        pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=0.0)
    return np.asarray(pil, dtype=np.float32)


def _paste_max(canvas: np.ndarray, patch: np.ndarray, rng: np.random.Generator) -> None:
    h, w = patch.shape
    top = int(rng.integers(0, canvas.shape[0] - h + 1))
    left = int(rng.integers(0, canvas.shape[1] - w + 1))
    region = canvas[top : top + h, left : left + w]
    np.maximum(region, patch, out=region)


def render_one(
    digit: np.ndarray, others: np.ndarray, style: DigitStyle, rng: np.random.Generator
) -> np.ndarray:
    """Draw one canvas [H, W] float32 in [0, 1] (see module docstring)."""
    n = style.canvas
    canvas = np.zeros((n, n), dtype=np.float32)
    size = int(rng.integers(style.digit_size[0], style.digit_size[1] + 1))
    scale = size / 8.0
    frag_px = max(2, min(n, int(round(style.fragment * scale))))
    for _ in range(int(rng.integers(style.clutter[0], style.clutter[1] + 1))):
        src = others[int(rng.integers(0, len(others)))]
        r, c = rng.integers(0, 8 - style.fragment + 1, size=2)
        frag = src[r : r + style.fragment, c : c + style.fragment]
        frag = _resize(frag, frag_px) * rng.uniform(*style.clutter_contrast)
        _paste_max(canvas, frag, rng)
    angle = float(rng.uniform(-style.rotation, style.rotation)) if style.rotation else 0.0
    glyph = _resize(digit, size, angle) * rng.uniform(*style.contrast)
    _paste_max(canvas, glyph, rng)
    if style.noise:
        canvas += rng.normal(0.0, style.noise, size=canvas.shape).astype(np.float32)
    np.clip(canvas, 0.0, 1.0, out=canvas)
    if style.invert:
        canvas = 1.0 - canvas
    return canvas


def render_split(
    source: SourceDigits,
    pool: np.ndarray,
    copies: int,
    style: DigitStyle,
    rng: np.random.Generator,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``copies`` images of every digit in ``pool`` (at most ``limit`` in all).

    Returns uint8 images [M, 1, H, W], labels [M] and source indices [M].
    Clutter is cut from the same pool, never from the digit being drawn.
    """
    order = np.concatenate([pool[rng.permutation(len(pool))] for _ in range(copies)])
    if limit is not None:
        order = order[:limit]
    pool_images = source.images[pool]
    images = np.empty((len(order), 1, style.canvas, style.canvas), dtype=np.uint8)
    for i, idx in enumerate(order):
        others = pool_images[pool != idx]
        canvas = render_one(source.images[idx], others, style, rng)
        images[i, 0] = np.round(canvas * 255.0).astype(np.uint8)
    return images, source.labels[order], order


def render_task(
    source: SourceDigits,
    pools: dict[str, np.ndarray],
    renders: Renders,
    style: DigitStyle,
    seed: int,
    stream: int,
    max_train: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Render train/val/test of one task; ``stream`` separates the tasks' random streams."""
    out = {}
    for k, split in enumerate(("train", "val", "test")):
        rng = np.random.default_rng([seed, stream, k])
        limit = max_train if split == "train" else None
        out[split] = render_split(source, pools[split], getattr(renders, split), style, rng, limit)
    return out
