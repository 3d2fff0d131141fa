"""The figures of a report: training curves, the confusion matrix, the mistakes, runs compared.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``, saved through
the Agg renderer), never with pyplot, so no window or global figure state is involved;
matplotlib is imported when the first figure is made.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jax_mnist.errors import UserError
from jax_mnist.runs import Run, display_names

MAX_MISTAKES = 48  # images in the gallery: the most confident mistakes first
DPI = 100


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches at :data:`DPI`, laid out to fit.

    Made with the object API (no pyplot, so no global state and no GUI backend); every figure
    of the reports, the run's and the study's, starts here so they look alike.
    """
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_curves(run: Run):
    """Training and validation loss and accuracy per epoch, with the logged training loss."""
    fig = new_figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = run.epochs
    x = [r["epoch"] for r in epochs]
    if run.steps and epochs:
        # The log points inside epochs, at fractional epochs: noisier, but they show the start.
        steps_per_epoch = epochs[0]["step"] / epochs[0]["epoch"]
        ax_loss.plot(
            [r["step"] / steps_per_epoch for r in run.steps],
            [r["loss"] for r in run.steps],
            color="tab:blue",
            alpha=0.3,
            linewidth=1,
            label="train (log points)",
        )
    for ax, key, scale in ((ax_loss, "loss", 1), (ax_acc, "accuracy", 100)):
        ax.plot(x, [scale * r[f"train_{key}"] for r in epochs], "o-", color="tab:blue", label="train")
        val = [(r["epoch"], scale * r[f"val_{key}"]) for r in epochs if r.get(f"val_{key}") is not None]
        if val:
            ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation")
        if run.test is not None and x:
            ax.plot(
                [x[-1]], [scale * run.test[f"test_{key}"]], "*", color="tab:red", markersize=12, label="test"
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{key} (%)" if scale == 100 else key)
        ax.grid(alpha=0.3)
        ax.legend()
        if x:
            ax.set_xticks(x if len(x) <= 20 else x[:: math.ceil(len(x) / 20)])
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    fig.suptitle(f"{run.name}: {run.config.model}, preset {run.config.preset}")
    return fig


def plot_confusion(matrix: np.ndarray, class_names: tuple[str, ...]):
    """The confusion matrix: counts in each cell, colored by the share of the true class."""
    n = len(class_names)
    fig = new_figure(max(6, 0.6 * n + 2), max(5.5, 0.6 * n + 1.5))
    ax = fig.subplots()
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(n), class_names)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"test confusion matrix: {100 * accuracy:.2f}% correct of {matrix.sum():,}")
    return fig


def plot_mistakes(
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    class_names: tuple[str, ...],
    limit: int = MAX_MISTAKES,
):
    """A grid of the misclassified images, the most confident mistakes first."""
    n, h, w = images.shape[:3]
    images = images.reshape(n, h, w)  # [N, H, W, 1] -> [N, H, W]
    predictions = probabilities.argmax(axis=-1)
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    shown = wrong[np.argsort(-confidence, kind="stable")][:limit]
    # One mosaic drawn by a single imshow (48 small axes take seconds to render): each tile is
    # a band for the labels above the image, with a margin on each side.
    cols, band, margin = 8, 16, 4
    rows = max(1, math.ceil(len(shown) / cols))
    tile_h, tile_w = band + h + margin, w + 2 * margin
    mosaic = np.zeros((rows * tile_h, cols * tile_w), np.uint8)
    scale = 2.6  # screen pixels per image pixel
    fig = new_figure(cols * tile_w * scale / DPI, rows * tile_h * scale / DPI + 0.4)
    ax = fig.subplots()
    ax.axis("off")
    for k, i in enumerate(shown):
        top, left = (k // cols) * tile_h, (k % cols) * tile_w
        mosaic[top + band : top + band + h, left + margin : left + margin + w] = images[i]
        p = predictions[i]
        ax.text(
            left + tile_w / 2,
            top + band - 1,
            f"true {class_names[labels[i]]}\npred {class_names[p]} ({probabilities[i, p]:.0%})",
            ha="center",
            va="bottom",
            fontsize=7,
            color="tab:red",
        )
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    title = f"{len(wrong):,} of {len(labels):,} test images misclassified"
    if len(wrong) > len(shown):
        title += f"; the {len(shown)} most confident mistakes"
    fig.suptitle(title if len(wrong) else "no test image misclassified", fontsize=10)
    return fig


def plot_comparison(runs: list[Run]):
    """Loss and accuracy per epoch of several runs on shared axes (validation solid, train dashed)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(12, 4.5)
    ax_loss, ax_acc = fig.subplots(1, 2)
    names = display_names(runs)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, name, color in zip(runs, names, colors, strict=True):
        x = [r["epoch"] for r in run.epochs]
        for ax, key, scale in ((ax_loss, "loss", 1), (ax_acc, "accuracy", 100)):
            ax.plot(x, [scale * r[f"train_{key}"] for r in run.epochs], "--", color=color, alpha=0.6)
            val = [
                (r["epoch"], scale * r[f"val_{key}"]) for r in run.epochs if r.get(f"val_{key}") is not None
            ]
            if val:
                ax.plot(*zip(*val, strict=True), "o-", color=color, label=name)
            else:
                ax.plot([], [], "--", color=color, label=f"{name} (train only)")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{title}: validation solid, training dashed")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def save_figure(fig, path: Path) -> Path:
    try:
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror})") from None
    return path
