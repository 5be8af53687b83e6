"""The ImageNet paper profiles end to end (see tests/test_e2e_profiles.py): one after the other in one copy, on a
tiny ImageNet-style ImageFolder of JPEGs, streamed; DVC reuses the data (the same params) and the dense ResNet-18
the DyNet and ODConv profiles share."""

from __future__ import annotations

import json

import pytest

from . import synthetic_data
from .e2e_project import _sh
from .test_e2e_profiles import apply, check_run, project

pytestmark = pytest.mark.e2e
__all__ = ["project"]  # fixture, used by name
IMAGENET = ["dynet-imagenet-resnet18", "odconv-imagenet-resnet18", "sdconv-imagenet-resnet50"]


def test_imagenet_profiles_stream_an_image_folder(project):
    root, env, base = project
    synthetic_data.image_folder(base / "imagenet", {"train": 6, "val": 2})
    synthetic_data.image_folder(base / "downstream", {"train": 6, "test": 2}, classes=2, seed=1)
    sets = [f"data.upstream.root={base / 'imagenet'}", f"data.downstream.root={base / 'downstream'}"]
    ran = {}
    for name in IMAGENET:
        apply(root, env, name, sets, transfer_dense=False)  # the CIFAR profile's run transfers the dense model
        out = _sh(["dvc", "repro"], root, env).stdout  # committed to the cache: the next profile reuses them
        ran[name] = out
        check_run(root, name)
        card = json.loads((root / "data/prepared/card.json").read_text())
        up = card["tasks"]["upstream"]
        assert "test_files.json" in up["sha256"] and "test_x.npy" not in up["sha256"]  # streamed
        assert up["counts"]["test"] == 6 and up["image_shape"] == [3, 32, 32]  # ImageNet's val/ is the test split
    # the ODConv profile reused the DyNet profile's data and dense ResNet-18 (same params, same recipe)
    assert "Stage 'prepare' didn't change, skipping" in ran["odconv-imagenet-resnet18"]
    assert "Stage 'pretrain' didn't change, skipping" in ran["odconv-imagenet-resnet18"]
