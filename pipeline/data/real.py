"""Real data sets read from a local folder: CIFAR-10/100 and any ImageFolder tree.

Nothing is fetched unless ``download: true`` is set for that task. Images are
materialised as uint8 arrays [N, C, H, W] so every later stage reads one format, or, for an ImageFolder with
``stream: true``, listed and decoded per batch (pipeline/data/streamed.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.data import cifar
from pipeline.data.streamed import FileImages
from pipeline.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
_CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # torchvision's downloaders


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
    folder = root / cifar.LAYOUTS[name].folder
    if download and not folder.is_dir():
        import torchvision

        getattr(torchvision.datasets, _CIFAR[name])(str(root), download=True)
    if not folder.is_dir():
        raise DataError(
            f"{key}.root: {name} not found: expected the python version of the data set in "
            f"'{folder}' (from https://www.cs.toronto.edu/~kriz/cifar.html), "
            f"or set {key}.download: true to fetch it"
        )
    try:
        return cifar.read_cifar(name, root)
    except DataError as err:
        raise DataError(f"{key}.root: {name} in '{root}' could not be read: {err}") from None


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_folder(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        cls_dir = folder / cls
        if cls_dir.is_dir():
            files.extend(
                (f, label) for f in sorted(cls_dir.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS
            )
    if not files:
        raise DataError(f"'{folder}' holds no images in class folders ({', '.join(classes[:5])}, ...)")
    return [f for f, _ in files], np.asarray([label for _, label in files], dtype=np.int64)


def _read_folder(folder: Path, classes: list[str], ds, desc: str) -> tuple[np.ndarray | FileImages, np.ndarray]:
    """A split's images: decoded into one uint8 array, or (``ds.stream``) listed for decoding per batch."""
    files, labels = _list_folder(folder, classes)
    images = FileImages(files, ds.image_size, ds.crop_ratio, ds.decode_threads)
    if ds.stream:
        return images, labels
    x = np.empty(images.shape, dtype=np.uint8)
    step = 256
    with tqdm(total=len(files), desc=desc, unit="img", leave=False) as bar:
        for i in range(0, len(files), step):
            x[i : i + step] = images[i : i + step].numpy()
            bar.update(min(step, len(files) - i))
    return x, labels


def take(x: np.ndarray | FileImages, index: np.ndarray) -> np.ndarray | FileImages:
    """The images at ``index``: array rows, or a streamed split's files (not decoded)."""
    return x.subset(index) if isinstance(x, FileImages) else x[index]


def load_imagefolder(root: Path, ds, rng: np.random.Generator, key: str
                     ) -> tuple[dict[str, tuple[np.ndarray | FileImages, np.ndarray]], list[str]]:
    """An ImageFolder tree: ``root/<class>/*.png`` or ``root/<split folder>/<class>/*`` (``ds.folders``).

    With split folders, the train folder is required; a val or test folder that is
    null or missing is carved from train (seeded, stratified). Without split
    folders all three are carved from the single tree.
    """
    if not root.is_dir():
        raise DataError(f"{key}.root: image folder '{root}' does not exist")
    folders = ds.folders
    has_splits = (root / folders.train).is_dir()
    classes = [p.name for p in _class_dirs(root / folders.train if has_splits else root)]
    if len(classes) < 2:
        raise DataError(f"{key}.root: '{root}' must hold at least two class folders, found {len(classes)}")
    if has_splits:
        splits = {"train": _read_folder(root / folders.train, classes, ds, "train")}
        for split in ("val", "test"):
            folder = getattr(folders, split)
            if folder is not None and (root / folder).is_dir():
                splits[split] = _read_folder(root / folder, classes, ds, split)
    else:
        splits = {"train": _read_folder(root, classes, ds, "images")}
    x, y = splits["train"]
    remaining = 1.0
    if "test" not in splits:
        rest, test = stratified_split(y, ds.test_fraction, rng)
        splits["test"] = (take(x, test), y[test])
        x, y = take(x, rest), y[rest]
        remaining -= ds.test_fraction
    if "val" not in splits:
        rest, val = stratified_split(y, ds.val_fraction / remaining, rng)
        splits["val"] = (take(x, val), y[val])
        x, y = take(x, rest), y[rest]
    splits["train"] = (x, y)
    return splits, classes
