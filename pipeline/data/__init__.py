"""One data registry: build both tasks from params, write them with a data card,
read them back (checked against the card) as tensors for the training engine.

Layout of ``data/prepared``::

    card.json                       source, sizes, counts per split and class, sha256 of every array
    upstream/{train,val,test}_{x,y}.npy      x: uint8 [N, C, H, W], y: int64 [N]
    downstream/{train,val,test}_{x,y}.npy
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
        task.splits["train"] = (x[keep], y[keep])


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
        splits, classes = real.load_imagefolder(root, ds.image_size, ds.val_fraction, ds.test_fraction, rng, key)
        task = Task(name, splits, classes, f"imagefolder {ds.root}")
    _subsample(task, ds.max_train, rng)
    return task


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def task_card(task: Task, ds: DatasetCfg, files: dict[str, str]) -> dict:
    x_train = task.splits["train"][0].astype(np.float64) / 255.0
    card = {
        "source": task.source,
        "description": ds.model_dump(mode="json") if ds.source == "digits" else {"source": ds.source, "root": ds.root},
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
            for suffix, arr in (("x", x), ("y", y)):
                path = folder / f"{split}_{suffix}.npy"
                with replacing(path) as tmp:
                    np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
                files[f"{split}_{suffix}.npy"] = sha256_file(path)
        card["tasks"][name] = task_card(task, getattr(cfg.data, name), files)
    write_json(out / "card.json", card)
    return card


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
    """A prepared task ready for the training engine: uint8 images, labels, normalisation."""

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
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
        for suffix in ("x", "y"):
            fname = f"{split}_{suffix}.npy"
            path = root / name / fname
            if not path.is_file():
                raise DataError(f"'{path}' is missing: rerun the prepare stage")
            if verify and sha256_file(path) != tc["sha256"].get(fname):
                raise DataError(f"'{path}' does not match its sha256 in card.json (modified or truncated)")
            try:
                arrays.append(np.load(path, allow_pickle=False))
            except (ValueError, OSError) as err:
                raise DataError(f"'{path}' cannot be read ({err}): rerun the prepare stage") from None
        x, y = arrays
        splits[split] = (torch.from_numpy(x), torch.from_numpy(y))
    return TensorTask(splits, tc["classes"], tc["mean"], tc["std"])
