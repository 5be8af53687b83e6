"""Every writer of a stage's files on a full disk: one error naming the path, the previous file intact, no
temporary file left (pipeline/atomic.py). The stage-level case (a subprocess, one line on stderr) is in
tests/test_faults.py."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from pipeline.atomic import WriteError, replacing, write_json
from pipeline.checkpoint import save_atomic
from pipeline.metrics import write_history, write_metrics, write_per_image
from pipeline.report.figures import _save
from pipeline.search.study import write_csv
from pipeline.tracking import StageRun, TrackingStoreFull, patient_client

from .full_disk import full_disk

PREVIOUS = b"the previous content\n"


def _write_metrics(p):
    write_metrics(p, {"test_acc": 0.5, "macs": 1e6})


def _write_history(p):
    write_history(p, [{"epoch": float(e), "val_acc": 0.1 * e, "pad": "x" * 5000} for e in range(20)])


def _write_per_image(p):
    write_per_image(p, "upstream", list(range(2000)), {"test_acc": [1.0] * 2000})


def _save_checkpoint(p):
    save_atomic({"weights": torch.randn(64, 64)}, p)


def _save_figure(p):
    fig, ax = plt.subplots()
    ax.imshow(np.random.default_rng(0).random((64, 64)))
    _save(fig, p)


def _write_csv(p):
    write_csv(p, [{"number": i, "state": "COMPLETE", "val_acc": 0.5, "note": "y" * 500} for i in range(50)])


def _save_array(p):
    with replacing(p) as tmp:
        np.save(tmp, np.zeros((64, 64)), allow_pickle=False)


WRITERS = {"metrics.json": _write_metrics, "history.csv": _write_history, "per_image.json": _write_per_image,
           "state.pt": _save_checkpoint, "figure.png": _save_figure, "trials.csv": _write_csv,
           "train_x.npy": _save_array, "best.json": lambda p: write_json(p, {"x": "z" * 100_000})}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_full_disk_keeps_the_previous_file(tmp_path, name):
    folder = tmp_path / "out"
    with full_disk(folder, keep={name: PREVIOUS}) as mounted:
        if mounted is None:
            pytest.skip("no tmpfs can be mounted here (needs root)")
        with pytest.raises(WriteError) as err:
            WRITERS[name](folder / name)
        assert str(err.value) == f"cannot write {folder / name}: no space left on device; the previous file is unchanged"
        assert (folder / name).read_bytes() == PREVIOUS
        assert sorted(p.name for p in folder.iterdir()) == sorted([name, "filler"])


@pytest.mark.parametrize("name", list(WRITERS))
def test_writers_replace_whole_files(tmp_path, name):
    path = tmp_path / "sub" / name
    WRITERS[name](path)
    first = path.read_bytes()
    path.write_bytes(PREVIOUS)
    WRITERS[name](path)
    assert path.read_bytes() != PREVIOUS and len(path.read_bytes()) == len(first)
    assert [p.name for p in path.parent.iterdir()] == [name]


def test_a_bug_in_the_writer_keeps_its_error_and_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_bytes(PREVIOUS)
    with pytest.raises(ZeroDivisionError):
        with replacing(path) as tmp:
            tmp.write_text("half")
            _ = 1 / 0
    assert path.read_bytes() == PREVIOUS and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_mlflow_artifact_on_a_full_disk_is_one_error_naming_the_path(tmp_path, monkeypatch):
    store, artifacts = tmp_path / "store", tmp_path / "artifacts"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    client = patient_client(patience=5)
    exp = client.create_experiment("full", artifact_location=artifacts.as_uri())
    run = StageRun(client, client.create_run(exp).info.run_id)
    (tmp_path / "big.bin").write_bytes(b"\1" * 200_000)
    with full_disk(artifacts) as mounted:
        if mounted is None:
            pytest.skip("no tmpfs can be mounted here (needs root)")
        with pytest.raises(TrackingStoreFull) as err:
            run.log_artifact(tmp_path / "big.bin")
    assert re.fullmatch(rf"MLflow store cannot write {re.escape(str(artifacts))}/\S+big.bin: no space left on device",
                        str(err.value)), str(err.value)


def test_a_saved_model_file_does_not_depend_on_the_writers_pid(tmp_path, monkeypatch):
    """torch.save names its records after the file it writes: the temporary name must not carry the pid into
    the bytes (model_file_bytes is a metric)."""
    import os

    obj = {"weights": torch.arange(16.0)}
    sizes = []
    for pid in (7, 1234567):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        path = tmp_path / str(pid) / "dynet.pt"
        save_atomic(obj, path)
        sizes.append(path.read_bytes())
    assert sizes[0] == sizes[1]
