import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from pipeline.train import fit, learning_rate

from .conftest import train_cfg

from .conftest import REPO
from .fit_tiny import run, tiny_cfg, tiny_task


def test_same_seed_gives_identical_metrics(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run(tmp_path / "a", epochs=3)
    b = run(tmp_path / "b", epochs=3)
    assert a["final"] == b["final"] and a["history"] == b["history"]
    assert a["final"]["test_acc"] > 0.5  # it learned the signal (chance is 0.25)


def test_kill_9_then_rerun_resumes_and_matches_uninterrupted(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    reference = run(ref_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.fit_tiny", str(cut_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.strip() == "EPOCH 1":  # two epochs checkpointed
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (cut_dir / "final.json").exists()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    resumed = json.loads((cut_dir / "final.json").read_text())
    assert resumed["resumed_from"] in (2, 3)
    assert resumed["final"] == reference["final"]
    assert resumed["history"] == reference["history"]


def test_resume_ignores_a_checkpoint_of_another_run_and_a_broken_one(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"fingerprint": "other", "epoch": 1}, ckpt)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 4))
    result = fit(model, tiny_task(), tiny_cfg(1), 0, ckpt, "mine", desc="t")
    assert result.resumed_from == 0
    ckpt.write_bytes(b"garbage")
    result = fit(model, tiny_task(), tiny_cfg(1), 0, ckpt, "mine", desc="t")
    assert result.resumed_from == 0


def test_a_kept_final_state_returns_the_finished_result_without_training_or_testing_again(tmp_path, monkeypatch):
    """keep_state: a stage that trained and tested, then failed (its tracking store away too long), reruns
    into the same result and weights, every epoch replayed to on_epoch once, and no step trained."""
    import pipeline.train as train
    from pipeline.models.cifar_resnet import CifarResNet

    ckpt = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    first_model = CifarResNet(8, 0.5, 16, 1, 4)
    first = fit(first_model, tiny_task(), tiny_cfg(2), 5, ckpt, "tiny", desc="t", keep_state=True)
    assert ckpt.exists()

    def no_training(*args, **kwargs):
        raise AssertionError("trained or tested again")

    monkeypatch.setattr(train, "evaluate_images", no_training)
    monkeypatch.setattr(train, "augment", no_training)
    torch.manual_seed(1)
    model, seen = CifarResNet(8, 0.5, 16, 1, 4), []
    again = fit(model, tiny_task(), tiny_cfg(2), 5, ckpt, "tiny", on_epoch=lambda e, m: seen.append(e), desc="t",
                keep_state=True)
    assert again.resumed_from == 2 and seen == [0, 1]
    assert (again.final, again.history, again.test_correct) == (first.final, first.history, first.test_correct)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), first_model.state_dict().values()))


def test_learning_rate_schedule():
    cfg = train_cfg({"epochs": 10, "optimizer": {"lr": 0.2}, "schedule": {"name": "cosine", "warmup_epochs": 2}})
    assert learning_rate(cfg, 0, 0, 10) == pytest.approx(0.2 * 0.1 / 2)
    assert learning_rate(cfg, 2, 0, 10) == pytest.approx(0.2)
    assert learning_rate(cfg, 6, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 9, 10) < 0.01
    step = train_cfg({"epochs": 10, "schedule": {"name": "step", "warmup_epochs": 0, "milestones": [3, 6], "gamma": 0.5}})
    assert [learning_rate(step, e, 0, 5) for e in (0, 3, 6)] == pytest.approx([0.1, 0.05, 0.025])
