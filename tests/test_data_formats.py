"""CIFAR's standard on-disk format read without torchvision (so any copy, synthetic ones too, reads), and
ImageFolder splits streamed from their files: the same pixels as the in-memory path, batch by batch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.complexity import count_macs
from pipeline.data import SPLITS, build_task, load_task, write_prepared
from pipeline.data.cifar import LAYOUTS, read_cifar, write_cifar
from pipeline.data.streamed import FileImages, MappedImages, load_image
from pipeline.errors import DataError
from pipeline.models import build_model
from pipeline.train import Normalizer, normalized

from . import synthetic_data
from .conftest import model_cfg
from .test_data import _real_data


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_format_round_trips(tmp_path, name, classes):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n))
              for s, n in (("train", 23), ("test", 7))}
    write_cifar(name, tmp_path, splits, [f"c{i}" for i in range(classes)])
    batch = pickle.load((tmp_path / LAYOUTS[name].folder / LAYOUTS[name].test).open("rb"), encoding="bytes")
    assert b"data" in batch and batch[b"data"].shape == (7, 3072)  # the official layout: bytes keys, flat rows
    out, names = read_cifar(name, tmp_path)
    assert names == [f"c{i}" for i in range(classes)]
    for s in ("train", "test"):
        assert np.array_equal(out[s][0], splits[s][0]) and np.array_equal(out[s][1], splits[s][1])


def test_cifar_pixels_are_planes_of_rows(tmp_path):
    """A row of the official files is the red plane, then green, then blue, each row-major."""
    x = np.zeros((1, 3, 32, 32), np.uint8)
    x[0, 1, 2, 5] = 200  # green, row 2, column 5
    write_cifar("cifar10", tmp_path, {"train": (np.repeat(x, 5, 0), np.zeros(5, int)), "test": (x, np.zeros(1, int))},
                ["a"])
    flat = pickle.load((tmp_path / "cifar-10-batches-py/test_batch").open("rb"), encoding="bytes")[b"data"][0]
    assert flat[1024 + 2 * 32 + 5] == 200 and flat.sum() == 200


def test_cifar_files_that_are_wrong_name_the_file(tmp_path):
    folder = synthetic_data.cifar("cifar10", tmp_path, classes=10, train_per_class=1, test_per_class=1)
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:50])
    with pytest.raises(DataError, match="data_batch_3.*not a CIFAR batch file"):
        read_cifar("cifar10", tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3' is missing"):
        read_cifar("cifar10", tmp_path)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    (folder / "data_batch_3").write_bytes((folder / "data_batch_1").read_bytes())
    with pytest.raises(DataError, match=r"test_batch.*expected data \[N, 3072\]"):
        read_cifar("cifar10", tmp_path)


def test_cifar_task_is_built_from_the_format_without_a_checksum(tmp_path):
    synthetic_data.cifar("cifar10", tmp_path, classes=10, train_per_class=10, test_per_class=2)
    task = build_task(_real_data(tmp_path, "cifar10", str(tmp_path), val_fraction=0.2), "upstream")
    assert [len(task.splits[s][1]) for s in SPLITS] == [80, 20, 20]
    assert task.classes == [f"class_{i}" for i in range(10)]


def _tree(root, splits, classes=3):
    return synthetic_data.image_folder(root, splits, classes)


@pytest.mark.parametrize("crop_ratio", [1.0, 0.875])
def test_load_image_resizes_the_shorter_side_then_crops_the_centre(tmp_path, crop_ratio):
    arr = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    short = round(32 / crop_ratio)
    ref = Image.fromarray(arr).resize((round(70 * short / 50), short), Image.Resampling.BILINEAR)
    left, top = (ref.size[0] - 32) // 2, (short - 32) // 2
    expected = np.asarray(ref.crop((left, top, left + 32, top + 32))).transpose(2, 0, 1)
    assert np.array_equal(load_image(tmp_path / "a.png", 32, crop_ratio), expected)


def _folder_cfg(tmp_path, **keys):
    return _real_data(tmp_path, "imagefolder", str(tmp_path / "imgs"), image_size=16, val_fraction=0.25,
                      test_fraction=0.25, **keys)


def test_streamed_split_has_the_in_memory_pixels(tmp_path):
    _tree(tmp_path / "imgs", {"train": 8, "val": 2})
    folders = {"train": "train", "val": None, "test": "val"}  # ImageNet: the test split is read from val/
    memory = build_task(_folder_cfg(tmp_path, folders=folders), "upstream")
    streamed = build_task(_folder_cfg(tmp_path, folders=folders, stream=True, decode_threads=3), "upstream")
    assert [len(memory.splits[s][1]) for s in SPLITS] == [18, 6, 6]
    for s in SPLITS:
        x = streamed.splits[s][0]
        assert isinstance(x, FileImages) and x.shape == memory.splits[s][0].shape
        assert np.array_equal(x[:].numpy(), memory.splits[s][0])
        assert np.array_equal(memory.splits[s][1], streamed.splits[s][1])
    assert all("/val/" in str(f) for f in streamed.splits["test"][0].files)


def test_streamed_task_round_trips_through_prepare(tmp_path):
    _tree(tmp_path / "imgs", {"train": 8, "test": 2})
    cfg = _folder_cfg(tmp_path, stream=True, stats_images=5)
    memory_cfg = _folder_cfg(tmp_path, stats_images=5)
    cards = {}
    for label, c in (("streamed", cfg), ("memory", memory_cfg)):
        tasks = {name: build_task(c, name) for name in ("upstream", "downstream")}
        cards[label] = write_prepared(tasks, c, tmp_path / label)
    up = cards["streamed"]["tasks"]["upstream"]
    assert {"train_files.json", "test_y.npy"} <= set(up["sha256"]) and "train_x.npy" not in up["sha256"]
    assert up["mean"] == cards["memory"]["tasks"]["upstream"]["mean"]  # the same seeded sample of 5 images
    data, ref = load_task("upstream", tmp_path / "streamed"), load_task("upstream", tmp_path / "memory")
    for s in SPLITS:
        assert torch.equal(data.splits[s][0][:], ref.splits[s][0]) and torch.equal(data.splits[s][1], ref.splits[s][1])
    lazy, full = normalized(data, "test"), normalized(ref, "test")
    assert isinstance(lazy, MappedImages) and len(lazy) == len(full)
    assert torch.equal(lazy[2:5], full[2:5]) and torch.equal(lazy[3], full[3])
    assert torch.equal(torch.cat(list(lazy.split(4))), full)
    model = build_model(model_cfg(arch="cifar_resnet", depth=8), 3, 3)
    assert count_macs(model, lazy, batch_size=4) == count_macs(model, full, batch_size=4)
    index = tmp_path / "streamed" / "upstream" / "test_files.json"
    index.write_text(index.read_text().replace("imgs", "elsewhere"))
    with pytest.raises(DataError, match="sha256"):
        load_task("upstream", tmp_path / "streamed")


def test_streamed_images_that_moved_stop_with_the_path(tmp_path):
    _tree(tmp_path / "imgs", {"train": 8, "test": 2})
    cfg = _folder_cfg(tmp_path, stream=True)
    write_prepared({name: build_task(cfg, name) for name in ("upstream", "downstream")}, cfg, tmp_path / "p")
    (tmp_path / "imgs").rename(tmp_path / "moved")
    with pytest.raises(DataError, match="does not exist: the data moved"):
        load_task("upstream", tmp_path / "p")


def test_normalizer_is_lazy_only_for_streamed_images():
    norm = Normalizer([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(norm(x), torch.full((2, 3, 4, 4), 2.0))
