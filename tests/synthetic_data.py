"""Tiny synthetic data sets in the real sets' on-disk formats: CIFAR-10/100's python pickles and an ImageNet-style
ImageFolder of JPEG files of assorted sizes, so the paper profiles run end to end without the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.cifar import write_cifar


def cifar(name: str, root: Path, classes: int, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """A CIFAR-format set under ``root`` (``root/cifar-10-batches-py`` or ``root/cifar-100-python``)."""
    rng = np.random.default_rng(seed)

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(classes), per_class)
        rng.shuffle(y)
        x = rng.integers(0, 256, size=(len(y), 3, 32, 32), dtype=np.uint8)
        x[:, y % 3] //= 2  # a little class signal
        return x, y

    return write_cifar(name, root, {"train": split(train_per_class), "test": split(test_per_class)},
                       [f"class_{i}" for i in range(classes)])


def image_folder(root: Path, splits: dict[str, int], classes: int = 3, seed: int = 0) -> Path:
    """``root/<split>/n0000000<c>/<i>.JPEG`` (ImageNet's layout), ``splits[split]`` images per class, each of
    its own size (between 40 and 72 pixels a side)."""
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(40, 73, size=2))
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                arr[..., c % 3] //= 2
                Image.fromarray(arr).save(folder / f"{split}_{i}.JPEG", quality=90)
    return root
