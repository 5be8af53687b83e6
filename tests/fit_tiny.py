"""Helper process for the resume test: one small, seeded training run.

Usage: python -m tests.fit_tiny OUT_DIR. Prints "EPOCH <n>" after each epoch's
checkpoint is written and writes OUT_DIR/final.json at the end.
"""

import json
import sys
from pathlib import Path

import torch

from pipeline.config import TrainCfg
from pipeline.data import TensorTask
from pipeline.models.cifar_resnet import CifarResNet
from pipeline.train import fit


def tiny_task(seed: int = 0, n: int = 640) -> TensorTask:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    for i in range(n):  # a learnable signal: a bright square whose position is the class
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * 8 + 2 : r * 8 + 6, c * 8 + 2 : c * 8 + 6] = 220
    splits = {"train": (x[:480], y[:480]), "val": (x[480:560], y[480:560]), "test": (x[560:], y[560:])}
    return TensorTask(splits, ["a", "b", "c", "d"], [0.2], [0.3])


def tiny_cfg(epochs: int = 4) -> TrainCfg:
    return TrainCfg.model_validate({
        "epochs": epochs, "batch_size": 32, "eval_batch_size": 500, "threads": 1, "label_smoothing": 0.0,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1 if epochs > 1 else 0},
        "augment": {"resized_crop": None, "crop_padding": 2, "hflip": False},
    })


def run(out: Path, epochs: int = 4) -> dict:
    torch.manual_seed(0)
    model = CifarResNet(8, 0.5, 16, 1, 4)
    result = fit(
        model, tiny_task(), tiny_cfg(epochs), seed=5, resume_path=out / "ckpt.pt", fingerprint="tiny",
        on_epoch=lambda e, m: print(f"EPOCH {e}", flush=True), desc="tiny",
    )
    record = {"final": result.final, "history": result.history, "resumed_from": result.resumed_from}
    (out / "final.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    run(Path(sys.argv[1]))
