"""Reports on finished runs: figures, an HTML page, a comparison of runs, a list of runs.

Everything here reads what a run directory holds (``config.json``, ``metrics.jsonl``,
``test_predictions.npz``) and nothing else, so a report can be made long after training, on
another machine, without the checkpoints. Figures are drawn with matplotlib's object API
(``matplotlib.figure.Figure``, saved through the Agg renderer), never with pyplot, so no
window or global figure state is involved.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from jax_mnist.config import Config
from jax_mnist.errors import UserError
from jax_mnist.metrics import confusion_matrix, softmax

CURVES, CONFUSION, MISTAKES, PAGE = "curves.png", "confusion.png", "mistakes.png", "report.html"
COMPARISON, COMPARISON_PAGE = "comparison.png", "comparison.html"
MAX_MISTAKES = 48  # images in the gallery: the most confident mistakes first
DPI = 100


@dataclasses.dataclass
class Run:
    """What a run directory holds, read back.

    Attributes:
      path: the run directory.
      config: its ``config.json``.
      records: the records of its ``metrics.jsonl`` in order (empty if there is none yet).
    """

    path: Path
    config: Config
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def epochs(self) -> list[dict[str, Any]]:
        """One record per finished epoch, in order."""
        return [r for r in self.records if r.get("kind") == "epoch"]

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The log points inside epochs (``kind: train``)."""
        return [r for r in self.records if r.get("kind") == "train"]

    @property
    def test(self) -> dict[str, Any] | None:
        """The final test evaluation, or None if the run has not finished."""
        tests = [r for r in self.records if r.get("kind") == "test"]
        return tests[-1] if tests else None

    @property
    def best_val_accuracy(self) -> float | None:
        values = [r["val_accuracy"] for r in self.epochs if r.get("val_accuracy") is not None]
        return max(values, default=None)


def load_run(path: str | Path) -> Run:
    """Reads the config and metrics of the run directory ``path``.

    Raises:
      UserError: ``path`` is not a run directory, or one of its files is unreadable.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not config_path.is_file():
        raise UserError(f"{path}: not a run directory (no config.json)")
    try:
        values = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: cannot read: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"{config_path}: must hold a JSON object of settings")
    config = Config.from_dict(values, source=str(config_path))
    return Run(path, config, read_metrics(path / "metrics.jsonl"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (none if it does not exist)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON record: {e}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


def load_predictions(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Test logits ``[N, C]`` and labels ``[N]`` of a finished run, or None if it has none."""
    path = run.path / "test_predictions.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            logits, labels = f["logits"], f["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot read test predictions: {e}") from None
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise UserError(f"{path}: logits {logits.shape} and labels {labels.shape} do not match")
    return logits, labels


# -- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_curves(run: Run):
    """Training and validation loss and accuracy per epoch, with the logged training loss."""
    fig = _figure(11, 4)
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
    fig = _figure(max(6, 0.6 * n + 2), max(5.5, 0.6 * n + 1.5))
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
    images = images.reshape(images.shape[:3])  # [N, H, W, 1] -> [N, H, W]
    predictions = probabilities.argmax(axis=-1)
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    shown = wrong[np.argsort(-confidence, kind="stable")][:limit]
    # One mosaic drawn by a single imshow (48 small axes take seconds to render): each tile is
    # a band for the labels above the image, with a margin on each side.
    cols, (h, w), band, margin = 8, images.shape[1:3], 16, 4
    rows = max(1, math.ceil(len(shown) / cols))
    tile_h, tile_w = band + h + margin, w + 2 * margin
    mosaic = np.zeros((rows * tile_h, cols * tile_w), np.uint8)
    scale = 2.6  # screen pixels per image pixel
    fig = _figure(cols * tile_w * scale / DPI, rows * tile_h * scale / DPI + 0.4)
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

    fig = _figure(12, 4.5)
    ax_loss, ax_acc = fig.subplots(1, 2)
    names = _display_names(runs)
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


def _display_names(runs: list[Run]) -> list[str]:
    """Directory names, or paths where two runs share a name."""
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        return [str(run.path) for run in runs]
    return names


def save_figure(fig, path: Path) -> Path:
    try:
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror})") from None
    return path


def write_text(path: Path, text: str) -> Path:
    try:
        path.write_text(text)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror})") from None
    return path


# -- the report of one run


def write_report(run_dir: str | Path) -> list[Path]:
    """Writes the figures and ``report.html`` of one run into its directory.

    The confusion matrix and the gallery of mistakes need ``test_predictions.npz``, which a
    run writes when it finishes; the test images are read again from the run's dataset.

    Returns:
      The files written: the PNGs, then the HTML page.
    """
    run = load_run(run_dir)
    if not run.epochs:
        raise UserError(f"{run.path}: no finished epoch in metrics.jsonl yet; nothing to plot")
    from jax_mnist.data import load_dataset
    from jax_mnist.data.datasets import DATASETS

    written = [save_figure(plot_curves(run), run.path / CURVES)]
    notes = []
    predictions = load_predictions(run)
    if predictions is None:
        notes.append("No test_predictions.npz: the run has not finished, so there is no test evaluation yet.")
    else:
        logits, labels = predictions
        if run.config.dataset not in DATASETS:
            raise UserError(f"{run.path / 'config.json'}: unknown dataset {run.config.dataset!r}")
        class_names = DATASETS[run.config.dataset].class_names
        if logits.shape[1] != len(class_names) or labels.max(initial=0) >= len(class_names):
            raise UserError(
                f"{run.path / 'test_predictions.npz'}: {logits.shape[1]} classes, "
                f"but {run.config.dataset} has {len(class_names)}"
            )
        matrix = confusion_matrix(labels, logits.argmax(axis=-1), len(class_names))
        written.append(save_figure(plot_confusion(matrix, class_names), run.path / CONFUSION))
        try:
            test_images = load_dataset(run.config).test_images
        except UserError as e:  # the confusion matrix needs no images: say why the gallery is missing
            test_images = None
            notes.append(f"No gallery of mistakes: the test images could not be read ({e}).")
        if test_images is not None:
            if len(test_images) != len(labels):
                raise UserError(
                    f"{run.path / 'test_predictions.npz'}: {len(labels)} predictions, "
                    f"but the {run.config.dataset} test set has {len(test_images)} images"
                )
            probabilities = softmax(logits)
            figure = plot_mistakes(test_images, labels, probabilities, class_names)
            written.append(save_figure(figure, run.path / MISTAKES))
    page = write_text(run.path / PAGE, render_run_page(run, written, notes))
    return [*written, page]


_CAPTIONS = {
    CURVES: "Loss and accuracy per epoch: training, validation, and the final test evaluation.",
    CONFUSION: "Test confusion matrix: rows are the true class, columns the prediction.",
    MISTAKES: "Misclassified test images with their true and predicted labels and the confidence.",
    COMPARISON: "Runs compared: validation curves solid, training curves dashed.",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
figcaption { color: #555; }
.note { color: #a60; }
"""


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _figure_html(path: Path, caption: str | None = None) -> str:
    """An embedded PNG (the page stands alone), linked to the file beside it."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    caption = html.escape(_CAPTIONS.get(path.name, "") if caption is None else caption)
    return (
        f'<figure><a href="{name}"><img src="data:image/png;base64,{data}" alt="{name}"></a>'
        f'<figcaption>{caption} (<a href="{name}">{name}</a>)</figcaption></figure>'
    )


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n"
        f"<p><small>Written by jax-mnist report on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.</small></p>\n</body>\n</html>\n"
    )


def render_run_page(run: Run, figures: list[Path], notes: list[str]) -> str:
    """The HTML page of one run: final figures, the figures, epochs and the config."""
    test, epochs = run.test, run.epochs
    summary = [
        ("test accuracy", _percent(test and test.get("test_accuracy"))),
        ("test loss", _number(test and test.get("test_loss"))),
        ("best validation accuracy", _percent(run.best_val_accuracy)),
        ("epochs", f"{len(epochs)} of {run.config.epochs}"),
        ("steps", str(epochs[-1]["step"]) if epochs else "-"),
        ("training time", f"{sum(r['epoch_time_s'] for r in epochs):.1f} s"),
        ("wall time", f"{test['wall_time_s']:.1f} s" if test and "wall_time_s" in test else "-"),
        ("mean images/s", f"{np.mean([r['images_per_s'] for r in epochs]):,.0f}" if epochs else "-"),
    ]
    header = "".join(
        f"<th>{h}</th>" for h in ("epoch", "train loss", "train acc", "val loss", "val acc", "time", "img/s")
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{v}</td>'
            for v in (
                r["epoch"],
                _number(r["train_loss"]),
                _percent(r["train_accuracy"]),
                _number(r.get("val_loss")),
                _percent(r.get("val_accuracy")),
                f"{r['epoch_time_s']:.1f} s",
                f"{r['images_per_s']:,.0f}",
            )
        )
        + "</tr>"
        for r in epochs
    )
    config = [(k, json.dumps(v)) for k, v in run.config.to_dict().items()]
    body = "\n".join(
        [
            f"<p>Run directory <code>{html.escape(str(run.path))}</code>.</p>",
            "<h2>Final figures</h2>",
            _table(summary),
            *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
            "<h2>Figures</h2>",
            *(_figure_html(p) for p in figures),
            "<h2>Epochs</h2>",
            f"<table><tr>{header}</tr>{rows}</table>",
            "<h2>Config</h2>",
            _table(config),
        ]
    )
    return _page(f"jax-mnist run {run.name}", body)


# -- several runs


def default_comparison_dir(run_dirs: list[Path]) -> Path:
    """Where a comparison goes without ``--out``: the directory holding the runs."""
    parents = [os.path.normpath(Path(p).parent) for p in run_dirs]
    try:
        return Path(os.path.commonpath(parents) or ".")
    except ValueError:  # relative and absolute paths mixed
        return Path(os.path.commonpath([os.path.abspath(p) for p in parents]))


def compare_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Writes ``comparison.png`` and ``comparison.html`` of several runs into ``out``.

    Args:
      run_dirs: the run directories, at least two.
      out: the directory to write into (created if needed); default: the directory that
        holds the runs (``runs/`` for ``runs/a runs/b``).

    Returns:
      The files written.
    """
    runs = [load_run(p) for p in run_dirs]
    if len(runs) < 2:
        raise UserError("compare: give at least two runs")
    for run in runs:
        if not run.epochs:
            raise UserError(f"{run.path}: no finished epoch in metrics.jsonl yet; nothing to compare")
    out = Path(out) if out is not None else default_comparison_dir([r.path for r in runs])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{out}: cannot create the output directory ({e.strerror}); choose another with --out DIR"
        ) from None
    chart = save_figure(plot_comparison(runs), out / COMPARISON)
    header = "".join(
        f"<th>{h}</th>"
        for h in ("run", "model", "preset", "epochs", "best val acc", "test acc", "test loss", "report")
    )
    rows = []
    for run, name in zip(runs, _display_names(runs), strict=True):
        test = run.test or {}
        report = run.path / PAGE
        link = f'<a href="{html.escape(os.path.relpath(report, out))}">{PAGE}</a>' if report.exists() else "-"
        cells = [
            html.escape(name),
            html.escape(run.config.model),
            html.escape(run.config.preset),
            f"{len(run.epochs)} of {run.config.epochs}",
            _percent(run.best_val_accuracy),
            _percent(test.get("test_accuracy")),
            _number(test.get("test_loss")),
            link,
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body = f"<table><tr>{header}</tr>{''.join(rows)}</table>\n{_figure_html(chart)}"
    page = out / COMPARISON_PAGE
    write_text(page, _page(f"jax-mnist: {len(runs)} runs compared", body))
    return [chart, page]


# -- the list of runs


@dataclasses.dataclass
class RunSummary:
    """One line of ``jax-mnist runs``."""

    path: Path
    model: str = "?"
    preset: str = "?"
    epochs_done: int = 0
    epochs: int = 0
    best_val_accuracy: float | None = None
    test_accuracy: float | None = None
    problem: str | None = None


def find_runs(root: str | Path) -> list[Path]:
    """The run directories (holding a ``config.json``) under ``root``, in name order.

    A run's own subdirectories (checkpoints) are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (runs go under runs/ unless --workdir says otherwise)")
    found = []
    for directory, subdirs, files in os.walk(root):
        if "config.json" in files:
            found.append(Path(directory))
            subdirs.clear()
        else:
            subdirs.sort()
    return sorted(found)


def summarize_runs(root: str | Path) -> list[RunSummary]:
    """A summary of each run under ``root``; an unreadable run says why instead of failing."""
    summaries = []
    for path in find_runs(root):
        try:
            run = load_run(path)
        except UserError as e:
            summaries.append(RunSummary(path, problem=str(e)))
            continue
        test = run.test
        summaries.append(
            RunSummary(
                path,
                model=run.config.model,
                preset=run.config.preset,
                epochs_done=len(run.epochs),
                epochs=run.config.epochs,
                best_val_accuracy=run.best_val_accuracy,
                test_accuracy=test.get("test_accuracy") if test else None,
            )
        )
    return summaries


def format_runs(summaries: list[RunSummary], root: str | Path) -> str:
    """The table ``jax-mnist runs`` prints: one run a line, paths relative to ``root``."""
    header = ("run", "model", "preset", "epochs", "best val acc", "test acc")
    rows = []
    for s in summaries:
        name = os.path.relpath(s.path, root)
        if s.problem:
            rows.append((name, "?", "?", "?", "?", s.problem))
            continue
        rows.append(
            (
                name,
                s.model,
                s.preset,
                f"{s.epochs_done}/{s.epochs}",
                _percent(s.best_val_accuracy),
                _percent(s.test_accuracy),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))]
        lines.append("  ".join([*cells, r[-1].rjust(max(len(header[-1]), 8))]).rstrip())
    return "\n".join(lines)
