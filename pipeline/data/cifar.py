"""CIFAR-10/100 in their standard on-disk format, the "python version" of
https://www.cs.toronto.edu/~kriz/cifar.html (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny
Images"), read without a checksum on the files, so a copy of one's own and the synthetic sets of the tests
read alike.

Layout: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``; each file a pickled dict whose ``data`` is uint8 [N, 3072] (the red,
green and blue planes of a 32 x 32 image, row-major) and whose labels are ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100). The official files were pickled by Python 2: keys may be bytes.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DataError


@dataclass(frozen=True)
class Layout:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels: str  # the label key of a batch
    names: str  # the class-name key of the meta file


LAYOUTS = {
    "cifar10": Layout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                      "batches.meta", "labels", "label_names"),
    "cifar100": Layout("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
}
SIDE = 32


def _unpickle(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise DataError(f"'{path}' is missing")
    try:
        with path.open("rb") as f:
            raw = pickle.load(f, encoding="bytes")  # noqa: S301 - the user's own data set files
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as err:
        raise DataError(f"'{path}' is not a CIFAR batch file ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"'{path}' is not a CIFAR batch file (a pickled {type(raw).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"'{path}' has no '{key}' entry (keys: {', '.join(sorted(d))})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or len(labels) != len(data):
        raise DataError(f"'{path}': expected data [N, {3 * SIDE * SIDE}] and N labels, got data {list(data.shape)} "
                        f"and {len(labels)} labels")
    return np.ascontiguousarray(data.reshape(-1, 3, SIDE, SIDE)), labels


def read_cifar(name: str, root: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """The official train and test sets of ``name`` under ``root/<folder>``: ({"train", "test"}: (x uint8
    [N, 3, 32, 32], y int64 [N])), class names."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    meta = _unpickle(folder / layout.meta)
    if layout.names not in meta:
        raise DataError(f"'{folder / layout.meta}' has no '{layout.names}' entry")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[layout.names]]
    parts = [_batch(folder / f, layout.labels) for f in layout.train]
    out = {"train": (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])),
           "test": _batch(folder / layout.test, layout.labels)}
    for split, (_, y) in out.items():
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"'{folder}': {split} labels outside [0, {len(classes)}) for {len(classes)} class names")
    return out, classes


def write_cifar(name: str, root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> Path:
    """Write ``splits`` (train and test: uint8 [N, 3, 32, 32], labels) in the standard format (bytes keys, as the
    official Python 2 pickles); the train set is cut into the layout's batch files. Returns the folder."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    folder.mkdir(parents=True, exist_ok=True)

    def dump(fname: str, entries: dict) -> None:
        with (folder / fname).open("wb") as f:
            pickle.dump({k.encode(): v for k, v in entries.items()}, f, protocol=2)

    dump(layout.meta, {layout.names: [c.encode() for c in classes]})
    x, y = splits["train"]
    for fname, idx in zip(layout.train, np.array_split(np.arange(len(y)), len(layout.train))):
        dump(fname, {"data": x[idx].reshape(len(idx), -1), layout.labels: y[idx].tolist()})
    x, y = splits["test"]
    dump(layout.test, {"data": x.reshape(len(y), -1), layout.labels: y.tolist()})
    return folder
