"""Report figures (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def sample_grid(images: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], n: int, path: Path) -> Path:
    """One row per task: the first ``n`` training images with their labels."""
    rows = len(images)
    fig, axes = plt.subplots(rows, n, figsize=(n * 0.9, rows * 1.15), squeeze=False)
    for r, (name, (x, y, classes)) in enumerate(images.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(y):
                continue
            img = x[c].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(classes[int(y[c])], fontsize=8)
        axes[r, 0].text(-0.15, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves(history: pd.DataFrame, title: str, path: Path) -> Path:
    """Loss (left) and accuracy (right) per epoch, train vs validation."""
    epochs = history.index.to_numpy() + 1
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        if key in history:
            ax_l.plot(epochs, history[key], style, marker="o", ms=3, label=key.replace("_", " "))
    for key, style in (("train_acc", "-"), ("val_acc", "--")):
        if key in history:
            ax_a.plot(epochs, history[key], style, marker="o", ms=3, label=key.replace("_", " "))
    ax_l.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    ax_a.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy", ylim=(0, 1.02))
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
