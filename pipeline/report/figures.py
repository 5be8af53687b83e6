"""Report figures (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.atomic import replacing  # noqa: E402


def _log_axis(axis) -> None:
    """Log scale with engineering labels (2M, 10M) on the major ticks only: minor labels overlap."""
    from matplotlib.ticker import EngFormatter, NullFormatter

    axis.set_major_formatter(EngFormatter(sep=""))
    axis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path, pad: float = 1.08) -> Path:
    fig.tight_layout(pad=pad)
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


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
    return _save(fig, path)


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
    return _save(fig, path)


def tradeoff(points: pd.DataFrame, x: str, xlabel: str, title: str, path: Path) -> Path:
    """Test accuracy against a cost column, one marker per model named in the legend (controls hollow)."""
    fig, ax = plt.subplots(figsize=(7.6, 3.8))
    markers = "os^Dvp<>h*"
    for i, (_, row) in enumerate(points.iterrows()):
        control = str(row["model"]).startswith("control:")
        ax.scatter(row[x], row["test_acc"], s=46, marker=markers[i % len(markers)], label=row["model"],
                   facecolors="none" if control else None, edgecolors=f"C{i % 10}", c=None if control else f"C{i % 10}")
    ax.set(xlabel=xlabel, ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.margins(0.1)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def mask_heatmaps(images: np.ndarray, masks: list[list[np.ndarray]], block_names: list[str], path: Path) -> Path:
    """One row per image: the image, then each gated block's executed positions (white = computed)."""
    rows, cols = len(images), 1 + len(block_names)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.05, rows * 1.1), squeeze=False)
    for r in range(rows):
        img = images[r].transpose(1, 2, 0)
        axes[r, 0].imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray")
        for c, m in enumerate(masks[r], start=1):
            axes[r, c].imshow(m, cmap="gray", vmin=0, vmax=1)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    for c, name in enumerate(["input", *block_names]):
        axes[0, c].set_title(name, fontsize=6)
    return _save(fig, path, pad=0.3)


def pareto(trials: pd.DataFrame, costs: list[tuple[str, str]], pareto_numbers: set[int], chosen: int,
           baselines: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    """Validation accuracy against each cost column: all trials, the Pareto-optimal ones, the chosen one, baselines."""
    fig, axes = plt.subplots(1, len(costs), figsize=(5.2 * len(costs), 3.8), squeeze=False)
    on_front = trials["trial"].isin(pareto_numbers)
    for ax, (col, label) in zip(axes[0], costs):
        ax.scatter(trials.loc[~on_front, col], trials.loc[~on_front, "metrics.val_acc"], s=22, c="0.6", label="trial")
        front = trials[on_front].sort_values(col)
        ax.plot(front[col], front["metrics.val_acc"], "o-", c="tab:orange", ms=5, lw=1, label="Pareto-optimal")
        pick = trials[trials["trial"] == chosen]
        ax.scatter(pick[col], pick["metrics.val_acc"], marker="*", s=180, c="tab:red", zorder=5, label="chosen")
        for (name, point), marker in zip(baselines.items(), ("s", "D")):
            ax.scatter(point[col], point["metrics.val_acc"], marker=marker, s=50, c="tab:blue" if marker == "s" else "tab:green",
                       zorder=4, label=name)
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.set(xlabel=f"{label} (log scale)", ylabel="validation accuracy", title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)


def latency_vs_macs(rows: pd.DataFrame, path: Path) -> Path:
    """Per-image latency against MACs per image, one panel per batch size, log-log."""
    from matplotlib.ticker import FormatStrFormatter

    batches = sorted(rows["batch"].unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(5.0 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        part = rows[rows["batch"] == batch]
        for _, r in part.iterrows():
            ax.errorbar(r["macs_per_image"], r["per_image_ms"], yerr=[[r["per_image_ms"] - r["q1_ms"] / batch],
                        [r["q3_ms"] / batch - r["per_image_ms"]]], fmt="o", ms=5, capsize=3)
            ax.annotate(r["variant"], (r["macs_per_image"], r["per_image_ms"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_axis(ax.xaxis)
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))  # a narrow range spans few decades
        ax.set(xlabel="MACs per image (log)", ylabel="ms per image (median, IQR bars; log)", title=f"batch {batch}")
        ax.grid(alpha=0.3, which="both")
        ax.margins(0.2)
    return _save(fig, path)


def ablation(table: pd.DataFrame, param: str, path: Path, metric: str = "test_acc") -> Path:
    """One line per stage: the metric's mean against the param's values, 95 % CI as error bars."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    labels = [str(v) for v in table[param]]
    x = np.arange(len(labels))
    for col in [c for c in table.columns if c.endswith(f" {metric}")]:
        stage = col.removesuffix(f" {metric}")
        mean = table[col].to_numpy(dtype=float)
        low = table.get(f"{stage} CI low", pd.Series([np.nan] * len(x))).to_numpy(dtype=float)
        high = table.get(f"{stage} CI high", pd.Series([np.nan] * len(x))).to_numpy(dtype=float)
        err = np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)])
        ax.errorbar(x, mean, yerr=err, fmt="o-", capsize=4, ms=5, label=stage)
    ax.set_xticks(x, labels)
    ax.set(xlabel=param, ylabel=f"{metric.replace('_', ' ')} (mean, 95 % CI)", title=f"Ablation: {param}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
