import json

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DigitStyle, parse_config
from pipeline.data import SPLITS, build_task, load_task, write_prepared
from pipeline.data import digits
from pipeline.errors import DataError

from .conftest import TINY, config, merge, params


def _prepare(cfg, out):
    tasks = {name: build_task(cfg, name) for name in ("upstream", "downstream")}
    return tasks, write_prepared(tasks, cfg, out)


def test_pools_are_disjoint_stratified_and_cover_everything():
    src = digits.load_source()
    pools = digits.split_pools(src.labels, config().data.digit_pools, seed=0)
    sets = {k: set(v.tolist()) for k, v in pools.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["train"] | sets["val"] | sets["test"]) == len(src.labels) == 1797
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = np.bincount(src.labels[pools[split]], minlength=10)
        assert np.all(np.abs(counts - frac * np.bincount(src.labels)) <= 1.0)


def test_rendered_splits_use_only_their_own_pool(tiny_cfg):
    task = build_task(tiny_cfg, "upstream")
    used = {s: set(v) for s, v in task.extra["source_digits_per_split"].items()}
    assert not (used["train"] & used["val"]) and not (used["train"] & used["test"]) and not (used["val"] & used["test"])
    down = build_task(tiny_cfg, "downstream")
    dused = {s: set(v) for s, v in down.extra["source_digits_per_split"].items()}
    # the downstream test digits were never seen in upstream training
    assert not (dused["test"] & used["train"])
    assert len(down.splits["train"][1]) == 150


def test_same_seed_gives_byte_identical_outputs(tiny_cfg, tmp_path):
    _, card_a = _prepare(tiny_cfg, tmp_path / "a")
    _, card_b = _prepare(tiny_cfg, tmp_path / "b")
    assert card_a == card_b
    for task in ("upstream", "downstream"):
        for f in (tmp_path / "a" / task).iterdir():
            assert f.read_bytes() == (tmp_path / "b" / task / f.name).read_bytes()
    other = config(merge(TINY, {"data": {"seed": 4}}))
    _, card_c = _prepare(other, tmp_path / "c")
    assert card_c["tasks"]["upstream"]["sha256"] != card_a["tasks"]["upstream"]["sha256"]


def test_card_counts_match_arrays(tiny_cfg, tmp_path):
    tasks, card = _prepare(tiny_cfg, tmp_path)
    on_disk = json.loads((tmp_path / "card.json").read_text())
    assert on_disk == card
    for name, task in tasks.items():
        tc = card["tasks"][name]
        assert tc["image_shape"] == [1, 32, 32]
        for s in SPLITS:
            x, y = task.splits[s]
            assert x.dtype == np.uint8 and y.dtype == np.int64 and len(x) == len(y) == tc["counts"][s]
            assert sum(tc["counts_per_class"][s]) == tc["counts"][s]


def test_digit_covers_a_minority_of_the_canvas():
    src = digits.load_source()
    style = DigitStyle.model_validate({**params()["data"]["upstream"]["style"], "clutter": [0, 0], "noise": 0.0})
    rng = np.random.default_rng(0)
    fractions = [(digits.render_one(src.images[i], src.images[:10], style, rng) > 0.05).mean() for i in range(50)]
    assert 0.03 < float(np.mean(fractions)) < 0.3


def test_load_task_detects_a_modified_array(tiny_cfg, tmp_path):
    _prepare(tiny_cfg, tmp_path)
    data = load_task("upstream", tmp_path)
    assert data.in_channels == 1 and data.num_classes == 10
    path = tmp_path / "upstream" / "train_x.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="sha256"):
        load_task("upstream", tmp_path)
    with pytest.raises(DataError, match="prepare stage first"):
        load_task("upstream", tmp_path / "missing")


IMAGEFOLDER = {"image_size": 32, "crop_ratio": 1.0, "stream": False, "decode_threads": 1, "stats_images": 10000,
               "folders": {"train": "train", "val": "val", "test": "test"}, "test_fraction": 0.2}


def _real_data(tmp_path, source: str, root: str, **keys):
    """params.yaml with the upstream task read from a local folder (every key its source asks for)."""
    group = {"source": source, "root": root, "val_fraction": 0.1, "max_train": None}
    group.update({"download": False} if source.startswith("cifar") else IMAGEFOLDER)
    raw = params()
    raw["data"]["upstream"] = {**group, **keys}
    return parse_config(raw)


def _make_tree(root, classes=("cat", "dog", "owl"), per_class=10):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_without_split_folders_is_split_seeded_and_stratified(tmp_path):
    _make_tree(tmp_path / "imgs")
    cfg = _real_data(tmp_path, "imagefolder", str(tmp_path / "imgs"), image_size=16, val_fraction=0.2, test_fraction=0.2)
    a, b = build_task(cfg, "upstream"), build_task(cfg, "upstream")
    assert a.classes == ["cat", "dog", "owl"]
    assert a.splits["train"][0].shape[1:] == (3, 16, 16)
    assert [len(a.splits[s][1]) for s in SPLITS] == [18, 6, 6]
    for s in SPLITS:
        assert np.array_equal(a.splits[s][0], b.splits[s][0])
        assert np.bincount(a.splits[s][1]).tolist() == [len(a.splits[s][1]) // 3] * 3


def test_imagefolder_with_split_folders(tmp_path):
    _make_tree(tmp_path / "ds" / "train", per_class=6)
    _make_tree(tmp_path / "ds" / "test", per_class=2)
    cfg = _real_data(tmp_path, "imagefolder", str(tmp_path / "ds"), image_size=8)
    task = build_task(cfg, "upstream")
    assert len(task.splits["test"][1]) == 6
    assert len(task.splits["val"][1]) + len(task.splits["train"][1]) == 18


def test_missing_real_data_gives_a_clear_message(tmp_path):
    cfg = _real_data(tmp_path, "cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"data.upstream.root: cifar10 not found.*cifar-10-batches-py.*download: true"):
        build_task(cfg, "upstream")
    cfg = _real_data(tmp_path, "imagefolder", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist"):
        build_task(cfg, "upstream")
