"""Reports on finished runs: the figures and an HTML page of one run, a comparison of runs.

What the report reads comes from the run directory alone (:mod:`jax_mnist.runs`), so a report
can be made long after training, on another machine, without the checkpoints. The figures are
drawn in :mod:`jax_mnist.plots`; this module writes them and the self-contained HTML pages
that embed them.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jax_mnist.errors import UserError
from jax_mnist.metrics import confusion_matrix, softmax
from jax_mnist.plots import plot_comparison, plot_confusion, plot_curves, plot_mistakes, save_figure

# Read in runs.py: re-exported, as callers (inference, the tests) import them from here.
from jax_mnist.runs import Run, display_names, load_predictions, load_run, percent
from jax_mnist.runs import read_metrics as read_metrics
from jax_mnist.runs import summarize_runs as summarize_runs

CURVES, CONFUSION, MISTAKES, PAGE = "curves.png", "confusion.png", "mistakes.png", "report.html"
COMPARISON, COMPARISON_PAGE = "comparison.png", "comparison.html"


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


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def figure_html(path: Path, caption: str | None = None) -> str:
    """The HTML of the PNG figure at ``path``: embedded, so the page stands alone, and linked to the file.

    Args:
      path: a PNG file beside the page.
      caption: the caption; by default the one this module knows for the file's name, if any.
    """
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


def html_page(title: str, body: str) -> str:
    """A whole HTML page in the reports' style: ``title`` as its title and heading, then ``body``.

    ``body`` is HTML, inserted as it is; the page ends with the date it was written.
    """
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
        ("test accuracy", percent(test.get("test_accuracy") if test else None)),
        ("test loss", _number(test.get("test_loss") if test else None)),
        ("best validation accuracy", percent(run.best_val_accuracy)),
        ("epochs", f"{len(epochs)} of {run.config.epochs:g}"),
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
                percent(r["train_accuracy"]),
                _number(r.get("val_loss")),
                percent(r.get("val_accuracy")),
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
            *(figure_html(p) for p in figures),
            "<h2>Epochs</h2>",
            f"<table><tr>{header}</tr>{rows}</table>",
            "<h2>Config</h2>",
            _table(config),
        ]
    )
    return html_page(f"jax-mnist run {run.name}", body)


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
    for run, name in zip(runs, display_names(runs), strict=True):
        test = run.test or {}
        report = run.path / PAGE
        link = f'<a href="{html.escape(os.path.relpath(report, out))}">{PAGE}</a>' if report.exists() else "-"
        cells = [
            html.escape(name),
            html.escape(run.config.model),
            html.escape(run.config.preset),
            f"{len(run.epochs)} of {run.config.epochs:g}",
            percent(run.best_val_accuracy),
            percent(test.get("test_accuracy")),
            _number(test.get("test_loss")),
            link,
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body = f"<table><tr>{header}</tr>{''.join(rows)}</table>\n{figure_html(chart)}"
    page = out / COMPARISON_PAGE
    write_text(page, html_page(f"jax-mnist: {len(runs)} runs compared", body))
    return [chart, page]
