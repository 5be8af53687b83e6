"""The stage entry points in-process on a tiny profile: determinism of the whole chain."""

import json
import os

from stages import prepare, pretrain, report


def _chain(cfg, folder, monkeypatch):
    folder.mkdir()
    monkeypatch.chdir(folder)
    prepare.main(cfg)
    pretrain.main(cfg)
    return json.loads((folder / "results/pretrain/metrics.json").read_text())


def test_same_params_give_identical_metrics_and_a_report(tiny_cfg, workdir, monkeypatch):
    a = _chain(tiny_cfg, workdir / "a", monkeypatch)
    b = _chain(tiny_cfg, workdir / "b", monkeypatch)
    assert a == b
    assert a["test_acc"] > 0.1
    report.main(tiny_cfg)  # in folder b
    md = (workdir / "b/reports/report.md").read_text()
    assert "Dense pretraining" in md and f"{a['test_acc']:.4f}" in md
    assert os.path.getsize(workdir / "b/reports/figures/samples.png") > 1000
