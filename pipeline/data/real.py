"""Real data sets read from a local folder: CIFAR-10/100 and any ImageFolder tree.

Nothing is fetched unless ``download: true`` is set for that task. Images are
materialised as uint8 arrays [N, C, H, W] so every later stage reads one format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "cifar-100-python"),
}


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, taken): ``fraction`` of every class goes to ``taken``."""
    rest, taken = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        taken.extend(idx[:k])
        rest.extend(idx[k:])
    return np.sort(np.asarray(rest, dtype=np.int64)), np.sort(np.asarray(taken, dtype=np.int64))


def load_cifar(name: str, root: Path, download: bool, key: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Official train and test sets; returns ({"train", "test"}: (x, y)), class names."""
    import torchvision

    cls_name, folder = _CIFAR[name]
    if not download and not (root / folder).is_dir():
        raise DataError(
            f"{key}.root: {name} not found: expected the python version of the data set in "
            f"'{root / folder}' (from https://www.cs.toronto.edu/~kriz/cifar.html), "
            f"or set {key}.download: true to fetch it"
        )
    ds_cls = getattr(torchvision.datasets, cls_name)
    out = {}
    try:
        for split, train in (("train", True), ("test", False)):
            ds = ds_cls(str(root), train=train, download=download)
            x = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))
            out[split] = (x, np.asarray(ds.targets, dtype=np.int64))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{key}.root: {name} in '{root}' could not be read: {err}") from None
    return out, list(ds.classes)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_folder(folder: Path, classes: list[str], size: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        cls_dir = folder / cls
        if cls_dir.is_dir():
            files.extend(
                (f, label) for f in sorted(cls_dir.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS
            )
    if not files:
        raise DataError(f"'{folder}' holds no images in class folders ({', '.join(classes[:5])}, ...)")
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, (f, _) in enumerate(tqdm(files, desc=desc, unit="img", leave=False)):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = size / min(w, h)  # resize the shorter side, then centre-crop
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                x[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except OSError as err:
            raise DataError(f"cannot read image '{f}': {err}") from None
    return x, np.asarray([label for _, label in files], dtype=np.int64)


def load_imagefolder(
    root: Path, size: int, val_fraction: float, test_fraction: float, rng: np.random.Generator, key: str
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """An ImageFolder tree: ``root/<class>/*.png`` or ``root/{train,val,test}/<class>/*``.

    With split folders, ``train`` is required; a missing ``val`` is carved from
    train and a missing ``test`` as well (seeded, stratified). Without split
    folders all three are carved from the single tree.
    """
    if not root.is_dir():
        raise DataError(f"{key}.root: image folder '{root}' does not exist")
    has_splits = (root / "train").is_dir()
    classes = [p.name for p in _class_dirs(root / "train" if has_splits else root)]
    if len(classes) < 2:
        raise DataError(f"{key}.root: '{root}' must hold at least two class folders, found {len(classes)}")
    if has_splits:
        splits = {"train": _read_folder(root / "train", classes, size, "train")}
        for split in ("val", "test"):
            if (root / split).is_dir():
                splits[split] = _read_folder(root / split, classes, size, split)
    else:
        splits = {"train": _read_folder(root, classes, size, "images")}
    x, y = splits["train"]
    remaining = 1.0
    if "test" not in splits:
        rest, test = stratified_split(y, test_fraction, rng)
        splits["test"] = (x[test], y[test])
        x, y = x[rest], y[rest]
        remaining -= test_fraction
    if "val" not in splits:
        rest, val = stratified_split(y, val_fraction / remaining, rng)
        splits["val"] = (x[val], y[val])
        x, y = x[rest], y[rest]
    splits["train"] = (x, y)
    return splits, classes
