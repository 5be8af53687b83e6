"""One data registry: build both tasks from params, write them with a data card,
read them back (checked against the card) as tensors for the training engine.

Layout of ``data/prepared``::

    card.json                       source, sizes, counts per split and class, sha256 of every array
    upstream/{train,val,test}_{x,y}.npy      x: uint8 [N, C, H, W], y: int64 [N]
    downstream/{train,val,test}_{x,y}.npy

A streamed ImageFolder (``stream: true``) writes ``<split>_files.json`` (its root, image size, crop ratio and
the image files relative to the root) instead of ``<split>_x.npy``; its images are decoded per batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import replacing, write_json
from pipeline.config import Config, DatasetCfg
from pipeline.data import digits, real
from pipeline.data.streamed import FileImages
from pipeline.errors import DataError
from pipeline.paths import PREPARED, repo_root

SPLITS = ("train", "val", "test")
TASKS = ("upstream", "downstream")


@dataclass
class Task:
    """One task's arrays plus what the card says of them."""

    name: str
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]
    source: str
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"][0].shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _resolve_root(root: str) -> Path:
    path = Path(root).expanduser()
    return path if path.is_absolute() else repo_root() / path


def _subsample(task: Task, max_train: int | None, rng: np.random.Generator) -> None:
    x, y = task.splits["train"]
    if max_train is not None and max_train < len(y):
        _, keep = real.stratified_split(y, max_train / len(y), rng)
        task.splits["train"] = (real.take(x, keep), y[keep])


def build_task(cfg: Config, name: str) -> Task:
    """Build ``upstream`` or ``downstream`` from ``data.<name>``."""
    ds: DatasetCfg = getattr(cfg.data, name)
    key = f"data.{name}"
    stream = TASKS.index(name) + 1
    if ds.source == "digits":
        source = digits.load_source()
        pools = digits.split_pools(source.labels, cfg.data.digit_pools, cfg.data.seed)
        rendered = digits.render_task(source, pools, ds.renders, ds.style, cfg.data.seed, stream, ds.max_train)
        task = Task(
            name,
            {s: (x, y) for s, (x, y, _) in rendered.items()},
            [str(i) for i in range(10)],
            digits.SOURCE,
            {"source_digits_per_split": {s: sorted(set(idx.tolist())) for s, (_, _, idx) in rendered.items()}},
        )
        return task
    rng = np.random.default_rng([cfg.data.seed, stream, 99])
    root = _resolve_root(ds.root or "")
    if ds.source in ("cifar10", "cifar100"):
        official, classes = real.load_cifar(ds.source, root, ds.download, key)
        x, y = official["train"]
        rest, val = real.stratified_split(y, ds.val_fraction, rng)
        splits = {"train": (x[rest], y[rest]), "val": (x[val], y[val]), "test": official["test"]}
        task = Task(name, splits, classes, f"{ds.source} from {ds.root}")
    else:
        splits, classes = real.load_imagefolder(root, ds, rng, key)
        task = Task(name, splits, classes, f"imagefolder {ds.root}", {"root": root, "stats_seed": [cfg.data.seed, stream]})
    _subsample(task, ds.max_train, rng)
    return task


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stats_images(task: Task, ds: DatasetCfg) -> np.ndarray:
    """The train images the normalisation statistics are measured on: all of them, or an ImageFolder's
    seeded sample of at most ``stats_images``."""
    x = task.splits["train"][0]
    if ds.source != "imagefolder" or ds.stats_images >= len(x):
        return x[:] if isinstance(x, FileImages) else x
    idx = np.sort(np.random.default_rng([*task.extra["stats_seed"], 7]).permutation(len(x))[: ds.stats_images])
    return x[idx].numpy() if isinstance(x, FileImages) else x[idx]


def task_card(task: Task, ds: DatasetCfg, files: dict[str, str]) -> dict:
    x_train = np.asarray(_stats_images(task, ds), dtype=np.float64) / 255.0
    if ds.source == "digits":
        description = ds.model_dump(mode="json")
    else:
        description = {"source": ds.source, "root": ds.root}
    if ds.source == "imagefolder":
        description.update(image_size=ds.image_size, crop_ratio=ds.crop_ratio, stream=ds.stream)
    card = {
        "source": task.source,
        "description": description,
        "image_shape": list(task.shape),
        "classes": task.classes,
        "counts": {s: int(len(task.splits[s][1])) for s in SPLITS},
        "counts_per_class": {
            s: np.bincount(task.splits[s][1], minlength=task.num_classes).tolist() for s in SPLITS
        },
        # per-channel statistics of the train split, used to normalise inputs
        "mean": x_train.mean(axis=(0, 2, 3)).round(6).tolist(),
        "std": x_train.std(axis=(0, 2, 3)).round(6).tolist(),
        "sha256": files,
    }
    if "source_digits_per_split" in task.extra:
        card["source_digits"] = {s: len(v) for s, v in task.extra["source_digits_per_split"].items()}
    return card


def write_prepared(tasks: dict[str, Task], cfg: Config, out: Path = PREPARED) -> dict:
    """Write arrays and card.json; return the card."""
    card: dict = {"seed": cfg.data.seed, "tasks": {}}
    for name, task in tasks.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for split in SPLITS:
            x, y = task.splits[split]
            if isinstance(x, FileImages):
                path = folder / f"{split}_files.json"
                write_json(path, _file_index(x, task.extra["root"]))
                files[path.name] = sha256_file(path)
                x = None
            for suffix, arr in (("x", x), ("y", y)):
                if arr is None:
                    continue
                path = folder / f"{split}_{suffix}.npy"
                with replacing(path) as tmp:
                    np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
                files[f"{split}_{suffix}.npy"] = sha256_file(path)
        card["tasks"][name] = task_card(task, getattr(cfg.data, name), files)
    write_json(out / "card.json", card)
    return card


def _file_index(x: FileImages, root: Path) -> dict:
    root = root.resolve()
    return {"root": str(root), "image_size": x.size, "crop_ratio": x.crop_ratio, "decode_threads": x.threads,
            "files": [str(Path(f).resolve().relative_to(root)) for f in x.files]}


def _read_index(path: Path) -> FileImages:
    try:
        index = json.loads(path.read_text())
        root = Path(index["root"])
        images = FileImages([root / f for f in index["files"]], int(index["image_size"]), float(index["crop_ratio"]),
                            int(index["decode_threads"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"'{path}' is not a file index ({type(err).__name__}: {err}): rerun the prepare stage") from None
    if not root.is_dir():
        raise DataError(f"'{path}' lists images under '{root}', which does not exist: the data moved? rerun the "
                        "prepare stage")
    return images


def first_images(name: str, split: str, n: int, root: Path = PREPARED) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images (uint8 [n, C, H, W]) and labels of a prepared split, without reading the rest."""
    folder = root / name
    y = np.load(folder / f"{split}_y.npy")[:n]
    if (folder / f"{split}_files.json").is_file():
        return _read_index(folder / f"{split}_files.json")[:n].numpy(), y
    return np.asarray(np.load(folder / f"{split}_x.npy", mmap_mode="r")[:n]), y


def read_card(root: Path = PREPARED) -> dict:
    path = root / "card.json"
    if not path.is_file():
        raise DataError(f"'{path}' not found: run the prepare stage first (dvc repro prepare)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"'{path}' is not valid JSON ({err}); rerun the prepare stage") from None


@dataclass
class TensorTask:
    """A prepared task ready for the training engine: uint8 images (a tensor, or a streamed split's
    :class:`FileImages`), labels, normalisation."""

    splits: dict[str, tuple[torch.Tensor | FileImages, torch.Tensor]]
    classes: list[str]
    mean: list[float]
    std: list[float]

    @property
    def in_channels(self) -> int:
        return int(self.splits["train"][0].shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_task(name: str, root: Path = PREPARED, verify: bool = True) -> TensorTask:
    """Load a prepared task, checking every array against the card's sha256."""
    card = read_card(root)
    if name not in card.get("tasks", {}):
        raise DataError(f"'{root / 'card.json'}' has no task '{name}': rerun the prepare stage")
    tc = card["tasks"][name]
    splits = {}
    for split in SPLITS:
        arrays = []
        streamed = f"{split}_files.json" in tc["sha256"]
        for fname in (f"{split}_files.json" if streamed else f"{split}_x.npy", f"{split}_y.npy"):
            path = root / name / fname
            if not path.is_file():
                raise DataError(f"'{path}' is missing: rerun the prepare stage")
            if verify and sha256_file(path) != tc["sha256"].get(fname):
                raise DataError(f"'{path}' does not match its sha256 in card.json (modified or truncated)")
            if fname.endswith(".json"):
                arrays.append(_read_index(path))
                continue
            try:
                arrays.append(torch.from_numpy(np.load(path, allow_pickle=False)))
            except (ValueError, OSError) as err:
                raise DataError(f"'{path}' cannot be read ({err}): rerun the prepare stage") from None
        x, y = arrays
        if len(x) != len(y):
            raise DataError(f"'{root / name}': {split} has {len(x)} images and {len(y)} labels: rerun the prepare stage")
        splits[split] = (x, y)
    return TensorTask(splits, tc["classes"], tc["mean"], tc["std"])
